"""The round DAG's shape does not depend on the number of silos: every per-silo step runs
inside one task (bounded pools, listing polls), never as one task per silo."""

from __future__ import annotations

from pathlib import Path

from airflow.dag_processing.dagbag import DagBag

REPO = Path(__file__).resolve().parents[2]


def round_dag(tmp_path: Path, monkeypatch, clients: int):
    federations = tmp_path / f"federations-{clients}"
    federations.mkdir()
    text = (REPO / "federations" / "banks.yaml").read_text()
    start, end = text.index("clients:\n"), text.index("quorum:\n")
    listed = "".join(f"  - {{id: bank-{i:04d}, bucket: s3://banks-shared/bank-{i:04d}}}\n" for i in range(clients))
    (federations / "banks.yaml").write_text(text[:start] + "clients:\n" + listed + text[end:])
    monkeypatch.setenv("FL_FEDERATIONS_DIR", str(federations))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags["fl_round__banks"]


def test_the_round_dags_tasks_do_not_grow_with_the_number_of_silos(tmp_path, monkeypatch):
    few, many = round_dag(tmp_path, monkeypatch, 5), round_dag(tmp_path, monkeypatch, 1000)
    assert sorted(few.task_ids) == sorted(many.task_ids)
    assert len(many.task_ids) < 30
    assert not any("bank-0" in task_id for task_id in many.task_ids)


def test_no_task_pushes_its_result_key_by_key(tmp_path, monkeypatch):
    """A TaskFlow task annotated `-> dict` would write one XCom per key of its result
    (summary's report: 20 writes a round) that nothing reads."""
    dag = round_dag(tmp_path, monkeypatch, 5)
    returns_dicts = {"aggregate", "validate", "summary"}
    assert returns_dicts <= set(dag.task_ids)
    assert [t.task_id for t in dag.tasks if getattr(t, "multiple_outputs", False)] == []
