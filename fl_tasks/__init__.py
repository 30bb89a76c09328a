"""The federated-learning library: coordinator steps, bucket protocol, client runtime.

Knows nothing of Airflow, so that a whole round runs and is tested without it and the same
code runs inside a client silo.
"""
