#!/usr/bin/env bash
# Runs once, when the postgres volume is first initialised (/docker-entrypoint-initdb.d):
# a separate role and database for the MLflow tracking server's backend store, next to
# Airflow's own metadata database.
set -euo pipefail

psql -v ON_ERROR_STOP=1 -v mlflow_password="${POSTGRES_MLFLOW_PASSWORD:?set POSTGRES_MLFLOW_PASSWORD}" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'EOSQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
EOSQL
