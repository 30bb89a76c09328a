"""Claims triage: an example task that brings its own model to a federation of insurers.

It shows what the built-in fraud task does not: a multi-class label, categorical inputs
learned as embeddings whose vocabulary comes from the data contract, a model with two
inputs (numeric features and category codes), a primary metric where lower is better
(log-loss), and generated example data.

A team packages a task like this one as an ordinary Python package:

    claims_triage/
      __init__.py
      task.py     # ClaimsTriageTask(fl_tasks.tasks.api.Task): model, training, metrics
      data.py     # example data for fl-simulate, the demo and tests (optional)

installed (or put on PYTHONPATH) on the Airflow workers and on every silo, next to
fl-airflow and the task's own dependencies (here torch, numpy, pandas and scikit-learn). The
federation file then names it, with its params and a data contract that has the columns the
task checks for:

    task:
      entrypoint: "claims_triage.task:ClaimsTriageTask"
      params: {embedding_dim: 4, hidden: [32, 16]}

Bump `ClaimsTriageTask.version` whenever the model or its encoding of rows changes: silos
with another version installed decline the round instead of sending incompatible weights.
"""
