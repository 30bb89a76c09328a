"""fl_airflow.metrics.emit_round_metrics: a round's figures reach Airflow's configured metrics
backend. Each test runs the call in a fresh Python process configured only through
AIRFLOW__METRICS__* (as a worker is), and a real receiver on loopback checks what arrived:
a UDP socket for StatsD, an OTLP/HTTP endpoint for OpenTelemetry."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fl_airflow.metrics import stat_name

from fl_tasks.coordinator.metrics import RoundMetrics

REPO = Path(__file__).resolve().parents[2]

METRICS = RoundMetrics(
    federation="banks", round_id="000007", clients_expected=4, clients_committed=3, clients_accepted=2,
    participation_rate=0.75, latency_seconds={"bank-a": 1.5, "bank.b": 4.25, "bank c/ü": 10.0},
    bytes_down=4096, bytes_up=3072, weights={"bank-a": 0.6, "bank.b": 0.4},
    rejected_by_reason={"norm": 1}, declined_by_reason={"data source": 1}, primary_metric="r2",
    candidate={"r2": -0.25}, champion={"r2": 0.5}, drifted_share=0.5)

# What the subprocess runs: the call under test and nothing else (Stats sets itself up from
# the [metrics] config when the Task SDK loads, as it does in a task process).
SCRIPT = """
import json, sys
from fl_airflow.metrics import emit_round_metrics
from fl_tasks.coordinator.metrics import RoundMetrics
print("SENT", emit_round_metrics(RoundMetrics.from_dict(json.loads(sys.argv[1]))))
"""


def expected_gauges() -> dict[str, float]:
    return {f"airflow.{stat_name('banks', k)}": v for k, v in METRICS.flat().items()}


def run_emit(env: dict[str, str]) -> int:
    import json

    paths = [str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]
    answer = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(METRICS.as_dict())], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **env})
    assert answer.returncode == 0, answer.stderr[-3000:]
    sent = [line for line in answer.stdout.splitlines() if line.startswith("SENT ")]
    assert sent, answer.stdout[-2000:] + answer.stderr[-2000:]
    return int(sent[-1].split()[1])


def test_names_keep_one_level_per_part_and_only_statsd_characters():
    assert stat_name("banks", "weight_bank.b") == "fl.banks.weight_bank__b"
    assert stat_name("banks", "weight_bank c/ü") == "fl.banks.weight_bank_c__"
    assert stat_name("bank-fed", "rejected_too large") == "fl.bank-fed.rejected_too_large"


@pytest.mark.skipif(importlib.util.find_spec("statsd") is None,
                    reason="the statsd client is not installed; add statsd==4.0.1 to requirements.txt "
                           "(Airflow's [statsd] extra) to run this test")
def test_statsd_gets_every_figure_as_a_gauge_and_each_silos_latency_as_a_timing():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(0.2)
        sent = run_emit({"AIRFLOW__METRICS__STATSD_ON": "True", "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
                         "AIRFLOW__METRICS__STATSD_PORT": str(udp.getsockname()[1]),
                         "AIRFLOW__METRICS__STATSD_PREFIX": "airflow"})
        lines: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                lines += udp.recvfrom(65536)[0].decode().splitlines()
            except TimeoutError:
                if lines:
                    break  # the sender has exited: everything it sent is here
    assert sent == len(METRICS.flat()) + len(METRICS.latency_seconds)
    gauges: dict[str, float] = {}
    timings: list[tuple[str, float]] = []
    for line in lines:
        name, _, rest = line.partition(":")
        if not name.startswith("airflow.fl."):
            continue  # Airflow's own metrics (e.g. serde.load_serializers) share the socket
        value, kind = rest.split("|")[:2]
        if kind == "g":
            gauges[name] = float(value)  # a negative gauge arrives as a reset to 0, then the value
        elif kind == "ms":
            timings.append((name, float(value)))
    assert gauges == expected_gauges()
    assert gauges["airflow.fl.banks.participation_rate"] == 0.75
    assert gauges["airflow.fl.banks.weight_bank__b"] == 0.4
    assert gauges["airflow.fl.banks.candidate_r2"] == -0.25
    assert sorted(timings) == [("airflow.fl.banks.update_latency", ms) for ms in (1500.0, 4250.0, 10000.0)]
    assert all(c.isalnum() or c in "_.-" for name in gauges for c in name)


class OtlpReceiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OtlpHandler)
        self.bodies: list[bytes] = []
        self.got = threading.Event()


class OtlpHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.got.set()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.skipif(importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None,
                    reason="the OTLP/HTTP exporter is not installed")
def test_opentelemetry_gets_every_figure_as_a_gauge_and_the_latencies_as_a_histogram():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    server = OtlpReceiver()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/metrics"
        sent = run_emit({"AIRFLOW__METRICS__OTEL_ON": "True", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": endpoint})
        assert server.got.wait(10), "no OTLP export arrived"  # the SDK exports when the process exits
    finally:
        server.shutdown()
        server.server_close()
    assert sent == len(METRICS.flat()) + len(METRICS.latency_seconds)
    gauges: dict[str, float] = {}
    histograms: dict[str, list] = {}
    for body in server.bodies:
        request = ExportMetricsServiceRequest.FromString(body)
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.HasField("gauge"):
                        gauges[metric.name] = metric.gauge.data_points[-1].as_double
                    elif metric.HasField("exponential_histogram"):
                        histograms[metric.name] = list(metric.exponential_histogram.data_points)
    assert gauges == expected_gauges()
    points = histograms["airflow.fl.banks.update_latency"]
    by_silo = {p.attributes[0].value.string_value: (p.count, p.sum) for p in points}
    assert by_silo == {"bank-a": (1, 1500.0), "bank.b": (1, 4250.0), "bank_c__": (1, 10000.0)}


def test_without_a_metrics_backend_the_call_still_succeeds_and_sends_nowhere():
    assert run_emit({"AIRFLOW__METRICS__STATSD_ON": "False", "AIRFLOW__METRICS__OTEL_ON": "False"}) == \
        len(METRICS.flat()) + len(METRICS.latency_seconds)
