"""The dashboard's own queries over a real run of the worker, drawn as a PNG (README "Operate").

    python -m tests.dashboard_snapshot [--minutes 6] [--out docs/dashboard.png]

Starts a broker of its own (scripts/kafka/local-kafka.sh), two worker processes (the tiny model on CPU) and a real
Prometheus server (scripts/prometheus.sh: built from the Go module proxy once) that scrapes both every 2 s with the
labels the chart's ServiceMonitor gives them (namespace, job, pod) and evaluates the chart's rules. Jobs arrive at a
rate that rises past what the two workers answer and falls back (one malformed job in 20, dead-lettered); one
worker is stopped for a minute halfway (a rebalance, a worker missing). Then every panel of
deploy/helm/rerank-worker/files/dashboard.json is asked of Prometheus over the run (`/api/v1/query_range`, the
panel's expressions as written, Grafana's variables set: `$__rate_interval` is 4 scrape intervals) and drawn in the
dashboard's grid with matplotlib (`pip install matplotlib`): time series as lines, stat panels as their last value,
the table as its rows. What it prints: the alerts that were pending or firing at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaProducer

from tests.integration.conftest import FAST, ROOT, LocalBroker, WorkerProcess
from tests.integration.jobs import make_jobs
from worker.kafka.topics import ensure_topics
from worker.settings import Settings

DASHBOARD = ROOT / "deploy/helm/rerank-worker/files/dashboard.json"
RULES = ROOT / "deploy/helm/rerank-worker/files/alerts.yaml"
SCRAPE_S = 2
NAMESPACE, JOB = "local", "rerank-worker"
BAD_EVERY = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_prometheus(work_dir: Path, targets: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": NAMESPACE, "pod": pod}}
                    for pod, port in targets.items()
                ],
            }
        ],
    }
    (work_dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = (work_dir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "bash",
            str(ROOT / "scripts/prometheus.sh"),
            f"--config.file={work_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={work_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # the first call builds Prometheus
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"prometheus exited {proc.returncode}: see {work_dir / 'prometheus.log'}") from None
            time.sleep(1)
    raise SystemExit("prometheus did not become ready")


def api(url: str, path: str, **params: Any) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}{path}?{query}", timeout=60) as resp:
        body = json.loads(resp.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def rate_profile(t: float, seconds: float) -> float:
    """Jobs per second at time t: a ramp past the workers' capacity, a plateau, a fall."""
    x = t / seconds
    if x < 0.15:
        return 4.0
    if x < 0.45:
        return 4.0 + (x - 0.15) / 0.3 * 76.0
    if x < 0.55:
        return 80.0
    return 6.0


def send_jobs(bootstrap: str, topic: str, seconds: float, stop: threading.Event, sent: list[int]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type="gzip", linger_ms=5)
    jobs = make_jobs(int(seconds * 40), min_docs=1, max_docs=40, seed=7, prefix="snap")
    started = time.monotonic()
    n = 0
    while not stop.is_set() and n < len(jobs):
        t = time.monotonic() - started
        if t >= seconds:
            break
        job = jobs[n]
        value = b'{"job_id": "' + job["job_id"].encode() + b'"' if n % BAD_EVERY == BAD_EVERY - 1 else orjson.dumps(job)
        producer.send(topic, key=job["job_id"].encode(), value=value)
        n += 1
        time.sleep(1.0 / rate_profile(t, seconds))
    producer.flush()
    producer.close()
    sent.append(n)


def substitute(expr: str, step_s: int) -> str:
    return (
        expr.replace("$__rate_interval", f"{4 * SCRAPE_S}s")
        .replace("$__interval", f"{step_s}s")
        .replace("$namespace", NAMESPACE)
        .replace("$job", JOB)
        .replace("$pod", ".*")
    )


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v).replace("{{ " + k + " }}", v)
    return out


def fmt_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "bytes":
        for suffix in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or suffix == "GiB":
                return f"{value:.1f} {suffix}"
            value /= 1024
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
    return f"{value:.3g}"


def draw(url: str, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.42  # inches per grid row
    fig = plt.figure(figsize=(24 * 0.75, rows * unit_h))
    fig.suptitle(
        f"{dashboard['title']}: the dashboard's queries over a {round((end - start) / 60)}-minute local run "
        "(two CPU workers, tiny model)",
        fontsize=12,
        y=1 - 0.2 / (rows * unit_h),
    )
    step = SCRAPE_S
    for panel in panels:
        g = panel["gridPos"]
        left, width = g["x"] / 24 + 0.004, g["w"] / 24 - 0.008
        bottom, height = 1 - (g["y"] + g["h"]) / rows + 0.012, g["h"] / rows - 0.03
        if panel["type"] == "row":
            fig.text(0.005, 1 - (g["y"] + 0.7) / rows, panel["title"], fontsize=11, weight="bold")
            continue
        ax = fig.add_axes((left, bottom, width, height))
        ax.set_title(panel["title"], fontsize=8, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        series = []
        for target in panel.get("targets", []):
            data = api(
                url, "/api/v1/query_range", query=substitute(target["expr"], step), start=start, end=end, step=step
            )
            for result in data["result"]:
                times, values = [], []
                for t, v in result["values"]:
                    if times and float(t) - start - times[-1] * 60 > 2 * step:
                        times.append(times[-1])  # a gap (a worker away): no line across it
                        values.append(math.nan)
                    times.append((float(t) - start) / 60)
                    values.append(float(v))
                series.append(
                    (legend(target.get("legendFormat", ""), result["metric"]), result["metric"], times, values)
                )
        if panel["type"] == "stat":
            ax.set_axis_off()
            text = "  ".join(fmt_value(values[-1], unit) for _, _, _, values in series if values) or "-"
            ax.text(0.5, 0.4, text, ha="center", va="center", fontsize=16, transform=ax.transAxes)
            continue
        if panel["type"] == "table":
            ax.set_axis_off()
            rows_text = [", ".join(f"{k}={v}" for k, v in sorted(labels.items())) for _, labels, _, _ in series]
            ax.text(
                0,
                0.9,
                "\n".join(rows_text[:6]) or "-",
                fontsize=6,
                va="top",
                family="monospace",
                transform=ax.transAxes,
            )
            continue
        for name, _, times, values in series:
            ax.plot(times, values, linewidth=0.9, label=name[:40])
        if not series:
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.tick_params(labelsize=6)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, unit=unit: fmt_value(v, unit)))
        if series and len(series) <= 8:
            ax.legend(fontsize=5, loc="upper left", frameon=False)
        ax.set_xlim(0, (end - start) / 60)
        ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"dashboard_snapshot: wrote {out}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=6.0, help="how long jobs are sent (default 6)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/dashboard.png")
    ap.add_argument("--model-dir", type=Path, help="default: the tiny offline model")
    ap.add_argument("--work-dir", type=Path, help="broker, Prometheus and worker files (default: temporary)")
    a = ap.parse_args()
    work_dir = a.work_dir or Path(tempfile.mkdtemp(prefix="rerank-dashboard-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    seconds = a.minutes * 60
    broker = LocalBroker(work_dir)
    broker.start()
    workers: list[WorkerProcess] = []
    prometheus = None
    try:
        tag = uuid.uuid4().hex[:6]
        topics = {"jobs_topic": f"snap{tag}.jobs", "results_topic": f"snap{tag}.results", "dlq_topic": f"snap{tag}.dlq"}
        ensure_topics(
            Settings(bootstrap_servers=broker.bootstrap),
            {topics["jobs_topic"]: 4, topics["results_topic"]: 2, topics["dlq_topic"]: 1},
        )
        if a.model_dir is None:
            from worker.testing.offline_model import build_random_reranker

            a.model_dir = build_random_reranker(work_dir / "tiny-qwen3-reranker", size="tiny", seed=0)
        ports = {f"rerank-worker-{i}": free_port() for i in range(2)}
        settings = {
            pod: Settings(
                **{**FAST, "http_port": port},
                bootstrap_servers=broker.bootstrap,
                group_id=f"snap{tag}",
                worker_id=pod,
                **topics,
            )
            for pod, port in ports.items()
        }
        workers = [WorkerProcess(s, a.model_dir, work_dir / f"{pod}.log") for pod, s in settings.items()]
        prometheus, url = start_prometheus(work_dir, ports)
        for w in workers:
            w.wait_for_log("partitions assigned", timeout_s=180)
        start = time.time() - 20
        stop, sent = threading.Event(), []
        sender = threading.Thread(
            target=send_jobs, args=(broker.bootstrap, topics["jobs_topic"], seconds, stop, sent), daemon=True
        )
        sender.start()
        time.sleep(seconds * 0.6)
        workers[1].proc.terminate()  # a worker away for a minute: its partitions move, then move back
        workers[1].proc.wait(60)
        time.sleep(60)
        workers[1] = WorkerProcess(settings["rerank-worker-1"], a.model_dir, work_dir / "rerank-worker-1-again.log")
        sender.join()
        time.sleep(45)  # the backlog drains
        end = time.time()
        alerts = api(url, "/api/v1/alerts")["alerts"]
        print(f"dashboard_snapshot: {sent[0] if sent else 0} jobs sent over {seconds:.0f} s", flush=True)
        for alert in alerts:
            print(f"dashboard_snapshot: alert {alert['labels']['alertname']} {alert['state']}", flush=True)
        draw(url, start, end, a.out)
    finally:
        for w in workers:
            w.stop()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        broker.stop()
    if a.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
