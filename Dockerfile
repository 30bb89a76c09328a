# One image for the whole stack in docker-compose.yaml: the Airflow components (coordinator
# DAGs, plugins), the MLflow tracking server and the `fl-client` silo runtime share the
# pinned environment of requirements.txt, exactly as `make` builds it in .venv.
FROM apache/airflow:3.3.2-python3.11

# Folders that named volumes are mounted on: created here so that a fresh volume inherits
# the airflow user's ownership (group 0 writable, as the Airflow image expects).
USER root
RUN mkdir -p /opt/fl/src /opt/fl/data-cache /opt/fl/silos /opt/fl/state \
    && chown -R airflow:0 /opt/fl \
    && chmod -R g+rwX /opt/fl
USER airflow

# Pinned requirements first (the slow layer). torch is pinned to a version number only, so
# the CPU wheel index lets pip take the CPU build (`+cpu`) instead of the CUDA one.
COPY --chown=airflow:0 requirements.txt requirements-nodeps.txt /opt/fl/
RUN pip install --no-cache-dir \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /opt/fl/requirements.txt \
    && pip install --no-cache-dir --no-deps -r /opt/fl/requirements-nodeps.txt

# The project itself, non-editable and without dependencies (all pinned above): this puts
# the `fl_tasks` package and the `fl-client` / `fl-simulate` console scripts in the image.
# dags/, plugins/ and federations/ are mounted by docker-compose.yaml instead.
COPY --chown=airflow:0 pyproject.toml /opt/fl/src/pyproject.toml
COPY --chown=airflow:0 fl_tasks /opt/fl/src/fl_tasks
RUN pip install --no-cache-dir --no-deps /opt/fl/src \
    && fl-client --help > /dev/null

# Tasks: a federation's task must be importable on the workers and on every silo. The
# example tasks are a folder on the path; your own task is `pip install`ed here the same
# way as fl_tasks (or copied and added to PYTHONPATH).
COPY --chown=airflow:0 examples /opt/fl/examples
ENV PYTHONPATH=/opt/fl/examples
