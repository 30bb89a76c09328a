"""A federation with aggregation.shards > 1: its round DAG maps the shard tasks over the shards;
with the default (1) the DAG keeps its shape."""

from __future__ import annotations

from pathlib import Path

from airflow.dag_processing.dagbag import DagBag

REPO = Path(__file__).resolve().parents[2]
SHARD_TASKS = {"shard_statistics", "aggregate_shard", "assemble_candidate"}


def test_a_sharded_federation_maps_the_shard_tasks(tmp_path, monkeypatch):
    federations = tmp_path / "federations"
    federations.mkdir()
    text = (REPO / "federations" / "banks.yaml").read_text()
    assert "\naggregation: weighted_median\n" in text
    (federations / "banks.yaml").write_text(text.replace(
        "\naggregation: weighted_median\n", "\naggregation: {strategy: weighted_median, shards: 4}\n"))
    monkeypatch.setenv("FL_FEDERATIONS_DIR", str(federations))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["fl_round__banks"]
    chain = ["aggregate", "shard_statistics", "aggregate_shard", "assemble_candidate", "request_evaluation"]
    for upstream, downstream in zip(chain, chain[1:]):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}, (upstream, downstream)
    for name in ("shard_statistics", "aggregate_shard"):
        task = dag.get_task(name)
        assert type(task).__name__.endswith("MappedOperator")
        assert task.op_kwargs_expand_input.value == {"shard": [0, 1, 2, 3]}
    assert "in 4 shards" in dag.doc_md


def test_an_unsharded_federation_has_no_shard_tasks(monkeypatch):
    monkeypatch.setenv("FL_FEDERATIONS_DIR", str(REPO / "federations"))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    dag = bag.dags["fl_round__banks"]
    assert not SHARD_TASKS & set(dag.task_ids)
    assert dag.get_task("aggregate").downstream_task_ids == {"request_evaluation"}
