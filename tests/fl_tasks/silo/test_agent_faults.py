"""The silo agent through the fault proxy: an S3 outage makes it wait, not die, and a commit
lost on the way (an update's or a decline's) is made again whole on the next poll."""

from __future__ import annotations

from datetime import datetime

from fl_tasks import protocol
from fl_tasks.protocol import DeclineManifest, UpdateManifest, sha256_hex
from fl_tasks.protocol.signing import verify_manifest
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.silo.agent import SiloAgent
from fl_tasks.silo.sources import FileSource

from tests.fl_tasks.silo.test_agent import KEY, ROWS, publish, silo_rows, task_of


def agent_through(proxy, bucket: str, tmp_path, **kwargs) -> SiloAgent:
    path = tmp_path / "silo.parquet"
    silo_rows().to_parquet(path, index=False)
    return SiloAgent("bank-a", "fed", f"s3://{bucket}", FileSource(path), ObjectStore(proxy.url, max_attempts=1),
                     **kwargs)


def fresh_bucket(store: ObjectStore, name: str) -> str:
    bucket = f"{name}-{datetime.now().strftime('%H%M%S%f')}"
    store.ensure_bucket(bucket)
    return bucket


def test_the_agent_waits_out_s3_errors_and_then_commits_a_whole_update(s3_server, s3_proxy, capsys, tmp_path):
    direct = ObjectStore(s3_server.endpoint_url)
    bucket = fresh_bucket(direct, "client-faults")
    publish(direct, bucket, "000001")
    agent = agent_through(s3_proxy, bucket, tmp_path)
    s3_proxy.fail(503, times=3, match=rf"^GET /{bucket}\?list-type=2")  # three polls cannot list
    s3_proxy.reset(times=1, match=r"^PUT .*/update/manifest\.json")  # the first commit is lost
    assert agent.run(poll_seconds=0.01, max_rounds=1, idle_exit_seconds=20) == 1
    assert len(s3_proxy.actions("fail")) == 3 and len(s3_proxy.actions("reset")) == 1
    logged = capsys.readouterr()
    assert logged.out.count("S3 unavailable, polling again") == 3
    assert "round 000001: S3 unavailable, trying again next poll" in logged.out
    update = UpdateManifest.from_json(direct.get_bytes(bucket, protocol.update_manifest_key("", "fed", "000001")))
    payload = direct.get_bytes(bucket, protocol.update_payload_key("", "fed", "000001"))
    assert sha256_hex(payload) == update.payload_sha256 and update.num_examples == ROWS


def test_a_decline_lost_on_the_way_is_committed_again(s3_server, s3_proxy, capsys, tmp_path):
    direct = ObjectStore(s3_server.endpoint_url)
    bucket = fresh_bucket(direct, "decline-faults")
    publish(direct, bucket, "000001", task=task_of(version="0"))
    agent = agent_through(s3_proxy, bucket, tmp_path, signing_key=KEY)
    s3_proxy.reset(times=1, match=r"^PUT .*/update/decline\.json")
    # The decline is the round's answer but not an update: the agent answers no round with one.
    assert agent.run(poll_seconds=0.01, max_rounds=1, idle_exit_seconds=1) == 0
    assert len(s3_proxy.actions("reset")) == 1
    assert "round 000001: S3 unavailable, trying again next poll" in capsys.readouterr().out
    decline = DeclineManifest.from_json(direct.get_bytes(bucket, protocol.decline_key("", "fed", "000001")))
    verify_manifest(decline, KEY)
    assert "the round needs version 0" in decline.reason
    assert direct.get_bytes(bucket, protocol.update_manifest_key("", "fed", "000001")) is None
