{{/* Names and labels. */}}
{{- define "rerank-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rerank-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rerank-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rerank-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rerank-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rerank-worker.labels" -}}
helm.sh/chart: {{ include "rerank-worker.chart" . }}
{{ include "rerank-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The worker image: repository@digest when a digest is given (immutable), else repository:tag. */}}
{{- define "rerank-worker.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end }}

{{/* The pod's ServiceAccount: serviceAccount.name (or the flat serviceAccountName of chart 0.1.0), <fullname> when
the chart creates it; empty: the namespace's default. */}}
{{- define "rerank-worker.serviceAccountName" -}}
{{- $name := .Values.serviceAccount.name | default .Values.serviceAccountName | default "" -}}
{{- if .Values.serviceAccount.create -}}
{{- $name | default (include "rerank-worker.fullname" .) -}}
{{- else -}}
{{- $name -}}
{{- end -}}
{{- end }}

{{/* One env value as a string. Numbers from a values file arrive as float64: 16777216 must not become 1.6777216e+07. */}}
{{- define "rerank-worker.str" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end }}

{{/* A setting from .Values.env, or the given default when unset or empty: (list $ "NAME" "default"). */}}
{{- define "rerank-worker.setting" -}}
{{- $root := index . 0 -}}
{{- $value := get $root.Values.env (index . 1) -}}
{{- if or (kindIs "invalid" $value) (eq (include "rerank-worker.str" $value) "") -}}
{{- index . 2 -}}
{{- else -}}
{{- include "rerank-worker.str" $value -}}
{{- end -}}
{{- end }}

{{- define "rerank-worker.httpPort" -}}
{{- include "rerank-worker.setting" (list . "RERANK_HTTP_PORT" "8080") | int -}}
{{- end }}

{{- define "rerank-worker.securityProtocol" -}}
{{- include "rerank-worker.setting" (list . "KAFKA_SECURITY_PROTOCOL" "PLAINTEXT") -}}
{{- end }}

{{- define "rerank-worker.saslEnabled" -}}
{{- if hasPrefix "SASL_" (include "rerank-worker.securityProtocol" .) }}true{{ end -}}
{{- end }}

{{- define "rerank-worker.tlsEnabled" -}}
{{- if has (include "rerank-worker.securityProtocol" .) (list "SSL" "SASL_SSL") }}true{{ end -}}
{{- end }}

{{- define "rerank-worker.caFile" -}}
{{- if .Values.kafka.tls.caSecret.name -}}
/etc/rerank-worker/kafka-ca/{{ .Values.kafka.tls.caSecret.key }}
{{- end -}}
{{- end }}

{{/* KEDA's name for the SASL mechanism (kafka scaler `sasl`). */}}
{{- define "rerank-worker.kedaSasl" -}}
{{- $mechanism := include "rerank-worker.setting" (list . "KAFKA_SASL_MECHANISM" "PLAIN") -}}
{{- get (dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512") $mechanism | default "plaintext" -}}
{{- end }}

{{- define "rerank-worker.shutdownTimeout" -}}
{{- include "rerank-worker.setting" (list . "RERANK_SHUTDOWN_TIMEOUT_S" "30") | float64 -}}
{{- end }}

{{/* Seconds between SIGTERM and SIGKILL: the value, or the shutdown timeout rounded up plus 15. */}}
{{- define "rerank-worker.gracePeriod" -}}
{{- $shutdown := include "rerank-worker.shutdownTimeout" . | float64 -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add (ceil $shutdown | int) 15 -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds | int -}}
{{- end -}}
{{- end }}

{{/* Values that contradict each other or the worker fail the render, with the reason. */}}
{{- define "rerank-worker.validate" -}}
{{- $partitions := .Values.jobsTopicPartitions | int -}}
{{- if lt $partitions 1 -}}
{{- fail "jobsTopicPartitions must be the partition count of the jobs topic (>= 1)" -}}
{{- end -}}
{{- if .Values.keda.enabled -}}
{{- $max := .Values.keda.maxReplicaCount | int -}}
{{- $min := .Values.keda.minReplicaCount | int -}}
{{- if gt $max $partitions -}}
{{- fail (printf "keda.maxReplicaCount=%d exceeds jobsTopicPartitions=%d: a worker beyond the jobs topic's partitions sits idle (scaling rule: replicas <= partitions); add partitions first" $max $partitions) -}}
{{- end -}}
{{- if lt $max 1 -}}
{{- fail "keda.maxReplicaCount must be >= 1" -}}
{{- end -}}
{{- if or (lt $min 0) (gt $min $max) -}}
{{- fail (printf "keda.minReplicaCount=%d must be between 0 and keda.maxReplicaCount=%d" $min $max) -}}
{{- end -}}
{{- else if gt (.Values.replicaCount | int) $partitions -}}
{{- fail (printf "replicaCount=%d exceeds jobsTopicPartitions=%d: a worker beyond the jobs topic's partitions sits idle (scaling rule: replicas <= partitions)" (.Values.replicaCount | int) $partitions) -}}
{{- end -}}
{{- $shutdown := include "rerank-worker.shutdownTimeout" . | float64 -}}
{{- $grace := include "rerank-worker.gracePeriod" . | int -}}
{{- if le ($grace | float64) (addf $shutdown 2) -}}
{{- fail (printf "terminationGracePeriodSeconds=%d must exceed RERANK_SHUTDOWN_TIMEOUT_S=%v + 2 s: Kubernetes would kill the worker before it commits its batch" $grace $shutdown) -}}
{{- end -}}
{{- range $key := list "KAFKA_SASL_USERNAME" "KAFKA_SASL_PASSWORD" -}}
{{- if ne (include "rerank-worker.setting" (list $ $key "")) "" -}}
{{- fail (printf "env.%s is not read from values: put the credentials in a Secret and name it in kafka.sasl.existingSecret" $key) -}}
{{- end -}}
{{- end -}}
{{- if and (include "rerank-worker.saslEnabled" .) (not .Values.kafka.sasl.existingSecret) -}}
{{- fail (printf "KAFKA_SECURITY_PROTOCOL=%s needs kafka.sasl.existingSecret (a Secret with the SASL username and password)" (include "rerank-worker.securityProtocol" .)) -}}
{{- end -}}
{{- if and .Values.kafka.tls.caSecret.name (ne (include "rerank-worker.setting" (list . "KAFKA_SSL_CAFILE" "")) "") -}}
{{- fail "set env.KAFKA_SSL_CAFILE or kafka.tls.caSecret.name, not both" -}}
{{- end -}}
{{- range $key := list "KAFKA_SSL_CERTFILE" "KAFKA_SSL_KEYFILE" -}}
{{- if and $.Values.kafka.tls.clientSecret.name (ne (include "rerank-worker.setting" (list $ $key "")) "") -}}
{{- fail (printf "set env.%s or kafka.tls.clientSecret.name, not both" $key) -}}
{{- end -}}
{{- end -}}
{{- $port := include "rerank-worker.httpPort" . | int -}}
{{- if or (lt $port 1) (gt $port 65535) -}}
{{- fail "env.RERANK_HTTP_PORT must be a fixed port (1-65535): probes, the Service and the ServiceMonitor use it" -}}
{{- end -}}
{{- if has (include "rerank-worker.setting" (list . "RERANK_HTTP_HOST" "0.0.0.0")) (list "127.0.0.1" "localhost" "::1") -}}
{{- fail "env.RERANK_HTTP_HOST must not be a loopback address: the kubelet probes the pod IP" -}}
{{- end -}}
{{- if and .Values.serviceAccountName .Values.serviceAccount.name (ne .Values.serviceAccountName .Values.serviceAccount.name) -}}
{{- fail (printf "serviceAccountName=%s and serviceAccount.name=%s disagree: set serviceAccount.name only (serviceAccountName is its old name)" .Values.serviceAccountName .Values.serviceAccount.name) -}}
{{- end -}}
{{- if and (not .Values.gpu.enabled) (hasPrefix "cuda" (include "rerank-worker.setting" (list . "RERANK_DEVICE" "auto"))) -}}
{{- fail "gpu.enabled=false with RERANK_DEVICE=cuda: set env.RERANK_DEVICE to cpu (or auto)" -}}
{{- end -}}
{{- end }}
