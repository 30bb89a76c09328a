"""The silo agent through the fault proxy: an S3 outage makes it wait, not die."""

from __future__ import annotations

from datetime import datetime

from fl_tasks import protocol
from fl_tasks.silo.agent import ClientRuntime
from fl_tasks.simulation.datasets import make_synthetic
from fl_tasks.protocol import UpdateManifest, sha256_hex
from fl_tasks.protocol.storage import ObjectStore

from tests.fl_tasks.test_client import publish


def test_the_agent_waits_out_s3_errors_and_then_commits_a_whole_update(s3_server, s3_proxy, capsys):
    direct = ObjectStore(s3_server.endpoint_url)
    bucket = f"client-faults-{datetime.now().strftime('%H%M%S%f')}"
    direct.ensure_bucket(bucket)
    publish(direct, bucket, "000001")
    runtime = ClientRuntime("bank-a", "fed", f"s3://{bucket}", make_synthetic(800, seed=2),
                            ObjectStore(s3_proxy.url, max_attempts=1))
    s3_proxy.fail(503, times=3, match=rf"^GET /{bucket}\?list-type=2")  # three polls cannot list
    s3_proxy.reset(times=1, match=r"^PUT .*/update/manifest\.json")  # the first commit is lost
    assert runtime.run(poll_seconds=0.01, max_rounds=1, idle_exit_seconds=20) == 1
    assert len(s3_proxy.actions("fail")) == 3 and len(s3_proxy.actions("reset")) == 1
    logged = capsys.readouterr()
    assert logged.out.count("S3 unavailable, polling again") == 3
    assert "round 000001: S3 unavailable, trying again next poll" in logged.out
    update = UpdateManifest.from_json(direct.get_bytes(bucket, protocol.update_manifest_key("", "fed", "000001")))
    payload = direct.get_bytes(bucket, protocol.update_payload_key("", "fed", "000001"))
    assert sha256_hex(payload) == update.payload_sha256 and update.num_examples == 800
