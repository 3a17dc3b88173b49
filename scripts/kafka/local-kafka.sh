#!/usr/bin/env bash
# local-kafka.sh - run a real single-node Apache Kafka 4.x broker (KRaft,
# combined broker+controller) on 127.0.0.1 without Docker.
#
# The broker jars come from Maven Central through Maven (see pom.xml beside
# this script) and are cached, so only the first run downloads anything.
#
#   local-kafka.sh start                  fetch if needed, start, wait until it
#                                         answers, print KAFKA_BOOTSTRAP_SERVERS=...
#   local-kafka.sh stop                   SIGTERM, wait, SIGKILL if it hangs
#   local-kafka.sh status                 exit 0 if running and answering
#   local-kafka.sh fetch                  only download/cache the jars
#   local-kafka.sh create-topic NAME [PARTITIONS]
#   local-kafka.sh logs                   print the tail of the broker logs
#
# Only the KAFKA_BOOTSTRAP_SERVERS=... line goes to stdout; every message goes
# to stderr, so `export "$(scripts/kafka/local-kafka.sh start)"` works.
# Environment variables are described in README.md and in usage() below.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly POM="$SCRIPT_DIR/pom.xml"
readonly LOG4J_CONFIG="$SCRIPT_DIR/log4j2.xml"

readonly HOST=127.0.0.1
KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
if [[ ! "$KAFKA_PORT" =~ ^[0-9]+$ ]]; then
  printf 'local-kafka: error: KAFKA_PORT must be a port number, got %s\n' "'$KAFKA_PORT'" >&2
  exit 1
fi
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
if [[ -z "${KAFKA_HOME_DIR:-}" ]]; then
  KAFKA_HOME_DIR="${HOME:?HOME is not set; set KAFKA_HOME_DIR}/.cache/rerank-worker/kafka-$KAFKA_VERSION"
fi
KAFKA_RUN_DIR="${KAFKA_RUN_DIR:-$KAFKA_HOME_DIR/run/$KAFKA_PORT}"
if [[ -n "${KAFKA_DATA_DIR:-}" ]]; then
  # A directory the caller chose is kept across restarts unless asked otherwise.
  KAFKA_WIPE_DATA="${KAFKA_WIPE_DATA:-0}"
else
  KAFKA_DATA_DIR="$KAFKA_RUN_DIR/data"
  KAFKA_WIPE_DATA="${KAFKA_WIPE_DATA:-1}"
fi
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:-}"
KAFKA_AUTO_CREATE_TOPICS="${KAFKA_AUTO_CREATE_TOPICS:-true}"
# Optional secured listeners (the integration tests use them): SASL_SSL with SCRAM-SHA-512, and SSL that requires a
# client certificate. Both need a PEM key + certificate chain (KAFKA_TLS_KEYSTORE, the key unencrypted PKCS#8) and
# the CA that signs client certificates (KAFKA_TLS_CA); SASL_SSL needs one SCRAM user, added when storage is formatted.
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-}"
KAFKA_MTLS_PORT="${KAFKA_MTLS_PORT:-}"
KAFKA_TLS_KEYSTORE="${KAFKA_TLS_KEYSTORE:-}"
KAFKA_TLS_CA="${KAFKA_TLS_CA:-}"
KAFKA_SCRAM_USER="${KAFKA_SCRAM_USER:-}"
KAFKA_SCRAM_PASSWORD="${KAFKA_SCRAM_PASSWORD:-}"
if [[ "$KAFKA_AUTO_CREATE_TOPICS" != true && "$KAFKA_AUTO_CREATE_TOPICS" != false ]]; then
  printf 'local-kafka: error: KAFKA_AUTO_CREATE_TOPICS must be true or false, got %s\n' "'$KAFKA_AUTO_CREATE_TOPICS'" >&2
  exit 2
fi
MVN="${MVN:-mvn}"
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
  JAVA="${JAVA:-$JAVA_HOME/bin/java}"
else
  JAVA="${JAVA:-java}"
fi

readonly LIBS_DIR="$KAFKA_HOME_DIR/libs"
readonly STAMP_FILE="$LIBS_DIR/.fetched"
readonly LOCK_DIR="$KAFKA_HOME_DIR/.lock"
readonly PID_FILE="$KAFKA_RUN_DIR/kafka.pid"
readonly SERVER_PROPS="$KAFKA_RUN_DIR/server.properties"
readonly CLIENT_PROPS="$KAFKA_RUN_DIR/client.properties"
readonly STDOUT_LOG="$KAFKA_RUN_DIR/kafka.out"
readonly SERVER_LOG="$KAFKA_RUN_DIR/server.log"
readonly TOOLS_LOG="$KAFKA_RUN_DIR/tools.log"
readonly BOOTSTRAP="$HOST:$KAFKA_PORT"

log() { printf 'local-kafka: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  cat <<EOF
Usage: ${0##*/} {start|stop|status|fetch|create-topic NAME [PARTITIONS]|logs|help}

Runs a single-node Apache Kafka $KAFKA_VERSION broker (KRaft, broker+controller)
on $HOST, without Docker. 'start' prints KAFKA_BOOTSTRAP_SERVERS=$BOOTSTRAP on stdout.

Environment (current value):
  KAFKA_VERSION          Kafka release fetched from Maven Central ($KAFKA_VERSION)
  KAFKA_PORT             client (PLAINTEXT) port ($KAFKA_PORT)
  KAFKA_CONTROLLER_PORT  KRaft controller port ($KAFKA_CONTROLLER_PORT)
  KAFKA_HOME_DIR         jar cache and state ($KAFKA_HOME_DIR)
  KAFKA_RUN_DIR          pid file, config, logs ($KAFKA_RUN_DIR)
  KAFKA_DATA_DIR         log.dirs ($KAFKA_DATA_DIR)
  KAFKA_WIPE_DATA        1: wipe KAFKA_DATA_DIR on each fresh start ($KAFKA_WIPE_DATA)
  KAFKA_START_TIMEOUT    seconds to wait for the broker to answer ($KAFKA_START_TIMEOUT)
  KAFKA_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL ($KAFKA_STOP_TIMEOUT)
  KAFKA_HEAP_OPTS        broker heap ($KAFKA_HEAP_OPTS)
  KAFKA_JVM_OPTS         extra broker JVM options (${KAFKA_JVM_OPTS:-none})
  KAFKA_AUTO_CREATE_TOPICS  auto.create.topics.enable: true or false ($KAFKA_AUTO_CREATE_TOPICS)
  KAFKA_SASL_SSL_PORT    port of a SASL_SSL listener, SCRAM-SHA-512 (${KAFKA_SASL_SSL_PORT:-none})
  KAFKA_MTLS_PORT        port of an SSL listener that requires client certificates (${KAFKA_MTLS_PORT:-none})
  KAFKA_TLS_KEYSTORE     PEM: the broker's unencrypted PKCS#8 key and certificate chain (secured listeners)
  KAFKA_TLS_CA           PEM: the CA whose client certificates the mTLS listener accepts
  KAFKA_SCRAM_USER, KAFKA_SCRAM_PASSWORD  the SCRAM-SHA-512 user, added when storage is formatted
  JAVA_HOME / JAVA       Java 17+ to run it ($JAVA)
  MVN                    Maven used by 'fetch' ($MVN)
EOF
}

# ---------------------------------------------------------------- helpers

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

check_settings() {
  local v
  for v in KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_START_TIMEOUT KAFKA_STOP_TIMEOUT; do
    is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
  done
  [[ "$KAFKA_PORT" != "$KAFKA_CONTROLLER_PORT" ]] ||
    die "KAFKA_PORT and KAFKA_CONTROLLER_PORT must differ (both $KAFKA_PORT)"
}

check_java() {
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found ('$JAVA'); install Java 17+ or set JAVA_HOME"
  local line major
  line="$("$JAVA" -version 2>&1 | head -n 1)"
  major="$(sed -E 's/^[^"]*"([0-9]+)(\.([0-9]+))?.*$/\1/' <<<"$line")"
  if [[ "$major" == 1 ]]; then
    major="$(sed -E 's/^[^"]*"1\.([0-9]+).*$/\1/' <<<"$line")"
  fi
  if ! is_uint "$major" || ((major < 17)); then
    die "Kafka $KAFKA_VERSION needs Java 17 or newer; '$JAVA' is: $line"
  fi
}

# Serialise fetch/start/stop of one KAFKA_HOME_DIR (parallel test runners may
# all call 'start' at once). mkdir is atomic; a lock left by a dead process is
# taken over.
acquire_lock() {
  mkdir -p "$KAFKA_HOME_DIR"
  local owner deadline=$((SECONDS + KAFKA_START_TIMEOUT + 300))
  until mkdir "$LOCK_DIR" 2>/dev/null; do
    owner="$(cat "$LOCK_DIR/pid" 2>/dev/null || true)"
    if [[ -n "$owner" ]] && ! kill -0 "$owner" 2>/dev/null; then
      log "taking over the lock of exited pid $owner"
      rm -rf "$LOCK_DIR"
      continue
    fi
    if ((SECONDS >= deadline)); then
      die "timed out waiting for $LOCK_DIR (held by pid ${owner:-?})"
    fi
    sleep 0.5
  done
  trap release_lock EXIT
  printf '%s\n' "$$" >"$LOCK_DIR/pid"
}

release_lock() { rm -rf "$LOCK_DIR"; }

# What the cache must match: the Kafka version and the dependency list.
fetch_stamp() {
  printf '%s %s\n' "$KAFKA_VERSION" "$(cksum <"$POM" | cut -d' ' -f1)"
}

is_fetched() {
  [[ -f "$STAMP_FILE" && -f "$LIBS_DIR/kafka_2.13-$KAFKA_VERSION.jar" ]] &&
    [[ "$(cat "$STAMP_FILE")" == "$(fetch_stamp)" ]]
}

cmd_fetch() {
  if is_fetched; then
    log "Kafka $KAFKA_VERSION jars cached in $LIBS_DIR"
    return 0
  fi
  command -v "$MVN" >/dev/null 2>&1 || die "Maven ('$MVN') is needed to fetch the Kafka jars"
  mkdir -p "$KAFKA_HOME_DIR"
  local tmp fetch_log start=$SECONDS
  tmp="$(mktemp -d "$KAFKA_HOME_DIR/libs.tmp.XXXXXX")"
  fetch_log="$KAFKA_HOME_DIR/fetch.log"
  log "fetching Kafka $KAFKA_VERSION and its dependencies with Maven (log: $fetch_log) ..."
  if ! "$MVN" -B -q -Dstyle.color=never -f "$POM" \
    -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$tmp" >"$fetch_log" 2>&1; then
    tail -n 30 "$fetch_log" >&2 || true
    rm -rf "$tmp"
    die "Maven could not fetch Kafka $KAFKA_VERSION (see $fetch_log)"
  fi
  if [[ ! -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]]; then
    rm -rf "$tmp"
    die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing (see $fetch_log)"
  fi
  fetch_stamp >"$tmp/.fetched"
  rm -rf "$LIBS_DIR"
  mv "$tmp" "$LIBS_DIR"
  # Should a concurrent fetch have won the race, our copy landed inside its
  # directory; the classpath ignores subdirectories, but tidy it up anyway.
  rm -rf "${LIBS_DIR:?}/${tmp##*/}"
  log "cached $(find "$LIBS_DIR" -name '*.jar' | wc -l | tr -d ' ') jars in $LIBS_DIR ($((SECONDS - start)) s)"
}

# Run a Kafka main class (CLI tool) from the cached classpath:
#   run_tool [--timeout SECONDS] MAIN_CLASS ARGS...
run_tool() {
  local -a limit=()
  if [[ "$1" == --timeout ]]; then
    if command -v timeout >/dev/null 2>&1; then
      limit=(timeout --kill-after=5 "$2")
    fi
    shift 2
  fi
  local main="$1"
  shift
  # shellcheck disable=SC2086 # KAFKA_TOOL_OPTS is a list of JVM flags
  ${limit[@]+"${limit[@]}"} "$JAVA" -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
    -Dlocal.kafka.log.file="$TOOLS_LOG" \
    ${KAFKA_TOOL_OPTS:-} \
    -cp "$LIBS_DIR/*" "$main" "$@"
}

port_open() {
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# Kafka-protocol check: an AdminClient lists topics through the client port.
answering() {
  port_open "$KAFKA_PORT" || return 1
  write_client_props
  run_tool --timeout 30 org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$BOOTSTRAP" --command-config "$CLIENT_PROPS" --list \
    >/dev/null 2>>"$TOOLS_LOG"
}

pid_cmdline() {
  if [[ -r "/proc/$1/cmdline" ]]; then
    tr '\0' ' ' <"/proc/$1/cmdline"
  else
    ps -p "$1" -o args= 2>/dev/null
  fi
}

# Print the broker's pid if the pid file names a live broker of this run dir.
broker_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  case "$(pid_cmdline "$pid")" in
    *kafka.Kafka*"$SERVER_PROPS"*) printf '%s\n' "$pid" ;;
    *) return 1 ;;
  esac
}

show_log_tail() {
  local f
  for f in "$STDOUT_LOG" "$SERVER_LOG"; do
    if [[ -s "$f" ]]; then
      printf -- '----- last lines of %s -----\n' "$f" >&2
      tail -n "${1:-40}" "$f" >&2
    fi
  done
}

write_client_props() {
  [[ -f "$CLIENT_PROPS" ]] && return 0
  cat >"$CLIENT_PROPS" <<'EOF'
# Client settings for local-kafka.sh's own admin calls: fail fast.
request.timeout.ms=5000
default.api.timeout.ms=10000
socket.connection.setup.timeout.ms=2000
socket.connection.setup.timeout.max.ms=2000
reconnect.backoff.max.ms=1000
EOF
}

secured_listeners() {
  [[ -n "$KAFKA_SASL_SSL_PORT" ]] && printf ',SASL_SSL://%s:%s' "$HOST" "$KAFKA_SASL_SSL_PORT"
  [[ -n "$KAFKA_MTLS_PORT" ]] && printf ',MTLS://%s:%s' "$HOST" "$KAFKA_MTLS_PORT"
  return 0
}

secured_settings() {
  [[ -z "$KAFKA_SASL_SSL_PORT$KAFKA_MTLS_PORT" ]] && return 0
  cat <<EOF
# Secured listeners (KAFKA_SASL_SSL_PORT, KAFKA_MTLS_PORT).
ssl.keystore.type=PEM
ssl.keystore.location=$KAFKA_TLS_KEYSTORE
ssl.truststore.type=PEM
ssl.truststore.location=$KAFKA_TLS_CA
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.mtls.ssl.client.auth=required
EOF
}

write_server_props() {
  if [[ -n "$KAFKA_SASL_SSL_PORT$KAFKA_MTLS_PORT" ]] && ! [[ -f "$KAFKA_TLS_KEYSTORE" && -f "$KAFKA_TLS_CA" ]]; then
    die "secured listeners need KAFKA_TLS_KEYSTORE and KAFKA_TLS_CA (PEM files)"
  fi
  cat >"$SERVER_PROPS" <<EOF
# Written by local-kafka.sh; rewritten on every fresh start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT$(secured_listeners)
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT$(secured_listeners)
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL
log.dirs=$KAFKA_DATA_DIR
$(secured_settings)

# Single node: every internal topic has one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0

num.partitions=4
auto.create.topics.enable=$KAFKA_AUTO_CREATE_TOPICS
delete.topic.enable=true

# Messages up to 16 MiB.
message.max.bytes=16777216
replica.fetch.max.bytes=16777216

# Small machine: few threads.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF
}

prepare_data_dir() {
  if [[ "$KAFKA_WIPE_DATA" == 1 && -d "$KAFKA_DATA_DIR" ]]; then
    rm -rf "${KAFKA_DATA_DIR:?}"
  fi
  mkdir -p "$KAFKA_DATA_DIR"
  local cluster_id out
  if [[ -f "$KAFKA_DATA_DIR/meta.properties" ]]; then
    log "reusing formatted storage in $KAFKA_DATA_DIR"
    return 0
  fi
  cluster_id="${KAFKA_CLUSTER_ID:-$(run_tool kafka.tools.StorageTool random-uuid 2>>"$TOOLS_LOG")}"
  [[ -n "$cluster_id" ]] || die "could not get a cluster id from kafka.tools.StorageTool (see $TOOLS_LOG)"
  local scram=()
  if [[ -n "$KAFKA_SASL_SSL_PORT" ]]; then
    [[ -n "$KAFKA_SCRAM_USER" && -n "$KAFKA_SCRAM_PASSWORD" ]] \
      || die "KAFKA_SASL_SSL_PORT needs KAFKA_SCRAM_USER and KAFKA_SCRAM_PASSWORD"
    scram=(--add-scram "SCRAM-SHA-512=[name=$KAFKA_SCRAM_USER,password=$KAFKA_SCRAM_PASSWORD]")
  fi
  if ! out="$(run_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$SERVER_PROPS" --ignore-formatted \
    "${scram[@]}" 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "formatting KRaft storage in $KAFKA_DATA_DIR failed"
  fi
}

# Wait until pid $1 answers on the client port; on failure print why.
wait_until_answering() {
  local pid="$1" deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "the broker (pid $pid) exited during startup"
      return 1
    fi
    if answering; then
      return 0
    fi
    sleep 1
  done
  log "the broker (pid $pid) did not answer on $BOOTSTRAP within ${KAFKA_START_TIMEOUT}s"
  return 1
}

# True while pid $1 exists and is not a zombie waiting to be reaped.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  if [[ -r "/proc/$1/stat" ]] && stat="$(cat "/proc/$1/stat" 2>/dev/null)"; then
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]] || return 1
  fi
  return 0
}

# Send SIGTERM, wait, then SIGKILL.
terminate() {
  local pid="$1" deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
  kill -TERM "$pid" 2>/dev/null || return 0
  while alive "$pid"; do
    if ((SECONDS >= deadline)); then
      log "pid $pid still alive after ${KAFKA_STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
      done
      break
    fi
    sleep 0.5
  done
}

print_bootstrap() { printf 'KAFKA_BOOTSTRAP_SERVERS=%s\n' "$BOOTSTRAP"; }

# ---------------------------------------------------------------- commands

cmd_start() {
  check_java
  cmd_fetch
  mkdir -p "$KAFKA_RUN_DIR"

  local pid
  if pid="$(broker_pid)"; then
    if wait_until_answering "$pid"; then
      log "already running (pid $pid)"
      print_bootstrap
      return 0
    fi
    show_log_tail
    die "a broker (pid $pid) is running but not answering; try '${0##*/} stop'"
  fi
  rm -f "$PID_FILE"

  local port
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    if port_open "$port"; then
      die "port $HOST:$port is already in use by another process; set KAFKA_PORT/KAFKA_CONTROLLER_PORT"
    fi
  done

  local start=$SECONDS
  write_server_props
  write_client_props
  prepare_data_dir
  : >"$STDOUT_LOG"
  : >"$SERVER_LOG"

  local -a launcher=(nohup)
  if command -v setsid >/dev/null 2>&1; then
    launcher=(setsid nohup)
  fi
  # The inner shell writes its own pid, which exec turns into the JVM's pid,
  # whether or not setsid had to fork.
  # shellcheck disable=SC2016,SC2086 # $$ is for the inner shell; the *_OPTS are flag lists
  "${launcher[@]}" bash -c 'echo $$ >"$0" && exec "$@"' "$PID_FILE" \
    "$JAVA" -server $KAFKA_HEAP_OPTS \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
    -Dlocal.kafka.log.file="$SERVER_LOG" \
    -Dkafka.logs.dir="$KAFKA_RUN_DIR" \
    $KAFKA_JVM_OPTS \
    -cp "$LIBS_DIR/*" kafka.Kafka "$SERVER_PROPS" \
    </dev/null >>"$STDOUT_LOG" 2>&1 &

  local i
  for ((i = 0; i < 50; i++)); do
    pid="$(broker_pid)" && break
    sleep 0.1
  done
  if [[ -z "$pid" ]]; then
    rm -f "$PID_FILE"
    show_log_tail
    die "the broker did not start (see $STDOUT_LOG)"
  fi
  log "started broker pid $pid (Kafka $KAFKA_VERSION, data $KAFKA_DATA_DIR, logs $KAFKA_RUN_DIR)"

  if ! wait_until_answering "$pid"; then
    show_log_tail
    terminate "$pid"
    rm -f "$PID_FILE"
    die "Kafka did not come up on $BOOTSTRAP"
  fi
  log "Kafka is answering on $BOOTSTRAP ($((SECONDS - start)) s)"
  print_bootstrap
}

cmd_stop() {
  local pid
  if ! pid="$(broker_pid)"; then
    rm -f "$PID_FILE"
    log "not running"
    return 0
  fi
  log "stopping broker pid $pid ..."
  terminate "$pid"
  if alive "$pid"; then
    die "pid $pid did not exit"
  fi
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  local pid
  if ! pid="$(broker_pid)"; then
    log "not running"
    return 3
  fi
  if ! answering; then
    log "running (pid $pid) but not answering on $BOOTSTRAP"
    return 1
  fi
  log "running (pid $pid), answering on $BOOTSTRAP"
  print_bootstrap
}

cmd_create_topic() {
  local name="${1:-}" partitions="${2:-4}"
  [[ -n "$name" ]] || die "usage: ${0##*/} create-topic NAME [PARTITIONS]"
  if ! is_uint "$partitions" || ((partitions == 0)); then
    die "PARTITIONS must be a positive integer, got '$partitions'"
  fi
  broker_pid >/dev/null || die "the broker is not running; run '${0##*/} start' first"
  write_client_props
  run_tool --timeout 60 org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$BOOTSTRAP" --command-config "$CLIENT_PROPS" \
    --create --if-not-exists --topic "$name" \
    --partitions "$partitions" --replication-factor 1 >&2 ||
    die "could not create topic '$name' (see $TOOLS_LOG)"
  log "topic '$name' ready ($partitions partitions)"
}

main() {
  local cmd="${1:-help}"
  [[ $# -gt 0 ]] && shift
  check_settings
  case "$cmd" in
    start)
      acquire_lock
      cmd_start
      ;;
    stop)
      acquire_lock
      cmd_stop
      ;;
    status) cmd_status ;;
    fetch)
      acquire_lock
      cmd_fetch
      ;;
    create-topic) cmd_create_topic "$@" ;;
    logs) show_log_tail 100 2>&1 ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
