"""Airflow adapters for fl_tasks: the deferrable quorum sensor and its trigger.

This package lives in `plugins/` (on the path of every Airflow component, the triggerer
included) rather than in the DAG folder, which the triggerer cannot import from.
"""
