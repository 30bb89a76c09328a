"""Static checks of docker-compose.yaml and Dockerfile (no Docker engine needed).

The stack cannot be started here, so these tests check what can go wrong before `docker
compose up`: the file against the Compose specification, every path it mounts or copies,
the `fl-client` flags against the real argparse parser, the client ids and buckets against
federations/banks.yaml, the environment variables against the code that reads them, the
Airflow commands against Airflow's own CLI parser, the MinIO users and policies, and that
every published port stays on 127.0.0.1.

They also check what one container says about another: every URL in the file names a
compose service and a port that service listens on (derived from its command line and
Airflow's or MLflow's own defaults, or from IMAGE_PORTS for images with fixed ports) and an
HTTP path it serves; every published port is one its service listens on; every Python module
and executable the file runs exists; every environment variable is read by something; the
Airflow options are real, current option names.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import importlib.util
import inspect
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from fl_tasks.silo.agent import build_parser
from fl_tasks.config import BUCKET_URI_PATTERN, load_federation, load_federations

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yaml"
FEDERATION = load_federation(REPO / "federations" / "banks.yaml")
DUMB_INIT = ["/usr/bin/dumb-init", "--"]

# Bind-mount sources that need not exist in the repository: Airflow writes its task logs to
# ./logs and `airflow config list` (in airflow-init) writes ./config/airflow.cfg; Docker and
# airflow-init create both folders, and .gitignore-d runtime output does not belong in git.
CREATED_AT_RUNTIME = {"logs", "config"}

# Airflow 3 gets the `celery` command group from apache-airflow-providers-celery, which the
# apache/airflow image ships but the development venv does not install (it runs no Celery),
# so Airflow's parser here cannot see these; they are the provider's subcommands.
CELERY_SUBCOMMANDS = {"worker", "flower", "stop"}

# The Airflow components of the official docker-compose.yaml, by their command.
AIRFLOW_COMPONENTS = {"api-server", "scheduler", "dag-processor", "triggerer", "celery worker"}

_VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def interpolate(text: str) -> str:
    """What Compose makes of `${VAR:-default}` with no .env and no such variables set."""
    text = str(text).replace("$$", "\0")
    return _VAR.sub(lambda m: m.group(2) or "", text).replace("\0", "$")


def as_argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def program(service: dict) -> list[str]:
    """entrypoint + command, without the dumb-init prefix."""
    argv = as_argv(service.get("entrypoint")) + as_argv(service.get("command"))
    return argv[len(DUMB_INIT):] if argv[:len(DUMB_INIT)] == DUMB_INIT else argv


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of every mount; source is '' for an anonymous volume."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), str(volume["target"])))
            continue
        parts = interpolate(volume).split(":")
        if len(parts) == 1:
            mounts.append(("", parts[0]))
        else:
            mounts.append((parts[0], parts[1]))
    return mounts


def is_host_path(source: str) -> bool:
    return interpolate(source).startswith((".", "/", "~"))


def repo_path(source: str) -> Path:
    return (REPO / interpolate(source)).resolve()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def airflow_services(services) -> dict[str, dict]:
    return {name: s for name, s in services.items() if "AIRFLOW__CORE__EXECUTOR" in environment(s)}


@pytest.fixture(scope="module")
def fl_clients(services) -> dict[str, tuple[dict, list[str]]]:
    found = {}
    for name, service in services.items():
        argv = program(service)
        if argv[:1] == ["fl-client"]:
            found[name] = (service, argv)
    return found


def minio_init_script(services) -> str:
    """The shell script minio-init runs, as the container sees it (`$$` unescaped)."""
    return interpolate("\n".join(as_argv(services["minio-init"].get("command"))))


def granted_users(services) -> dict[str, str]:
    """MinIO user -> the minio-init variable holding its secret (`grant USER "${VAR}"`)."""
    return dict(re.findall(r'^\s*grant\s+(\S+)\s+"\$\{(\w+)\}"\s*$', minio_init_script(services), re.M))


def policy_of(user: str) -> dict:
    return json.loads((REPO / "deploy" / "minio" / "policies" / f"{user}.json").read_text())


def buckets_granted(policy: dict) -> set[str]:
    """Bucket names a policy reaches; fails on anything broader than named buckets."""
    buckets = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow", statement
        for action in statement["Action"]:
            assert action in {"s3:GetBucketLocation", "s3:ListBucket", "s3:GetObject", "s3:PutObject",
                              "s3:DeleteObject"}, f"unexpected action {action}"
        for arn in statement["Resource"]:
            match = re.fullmatch(r"arn:aws:s3:::([a-z0-9][a-z0-9.-]+[a-z0-9])(/\*)?", arn)
            assert match, f"resource {arn} is not one named bucket (or its objects)"
            buckets.add(match.group(1))
    return buckets


# --- the Compose specification ---------------------------------------------------------

def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("check-jsonschema")
    assert exe.exists(), "check-jsonschema is not installed: pip install -r requirements.txt"
    return subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_validates_against_compose_spec():
    result = _check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_check_rejects_a_broken_file(tmp_path, compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["postgres"]["healthchek"] = broken["services"]["postgres"].pop("healthcheck")
    path = tmp_path / "docker-compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = _check_jsonschema(path)
    assert result.returncode != 0 and "healthchek" in result.stdout, result.stdout + result.stderr


# --- build, Dockerfile, mounted paths ----------------------------------------------------

def test_build_contexts_and_dockerfiles_exist(services, airflow_services, fl_clients):
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert set(airflow_services) | set(fl_clients) <= set(built), "Airflow and fl-client must use our image"
    for name, build in built.items():
        build = {"context": build} if isinstance(build, str) else build
        context = repo_path(build.get("context", "."))
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
    images = {s.get("image") for s in services.values() if "build" in s}
    assert len(images) == 1, f"services built from the Dockerfile should share one image tag: {images}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_dockerfile_base_image_matches_the_pinned_airflow():
    instructions = _dockerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms == ["apache/airflow:3.3.2-python3.11"]
    pinned = re.search(r"^apache-airflow==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert froms[0].split(":")[1].split("-")[0] == pinned
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert re.search(r"pip install .*-r \S*requirements\.txt", runs)
    # The project itself: non-editable, no dependencies (all pinned in requirements.txt).
    project = re.search(r"pip install (.*--no-deps.*?)(?:&&|$)", runs)
    assert project and " -e " not in f" {project.group(1)} ", runs
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in runs


def test_dockerfile_copy_sources_exist_and_are_not_ignored():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = []
    for op, args in _dockerfile_instructions():
        if op in ("COPY", "ADD"):
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            copied += tokens[:-1]
    assert {"requirements.txt", "pyproject.toml", "fl_tasks"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), f"COPY source {source} does not exist"
        for pattern in ignored:
            assert not fnmatch.fnmatch(source, pattern.rstrip("/")), f"{source} is excluded by .dockerignore {pattern}"


def test_mounted_host_paths_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    host_paths = set()
    for name, service in services.items():
        for source, target in volume_mounts(service):
            if not source:
                continue
            if not is_host_path(source):
                assert source in declared, f"{name}: named volume {source} is not declared under volumes:"
                continue
            path = repo_path(source)
            assert path.is_relative_to(REPO), f"{name}: {source} points outside the repository"
            host_paths.add(path.relative_to(REPO).as_posix())
            if path.relative_to(REPO).as_posix() in CREATED_AT_RUNTIME:
                continue
            assert path.exists(), f"{name}: host path {source} (-> {target}) does not exist"
    # The ones the stack depends on are really mounted.
    assert {"dags", "plugins", "federations", "deploy/postgres", "deploy/minio/policies"} <= host_paths


# --- fl-client services ------------------------------------------------------------------

def test_one_fl_client_per_federation_client(fl_clients):
    ids = sorted(build_parser().parse_args(argv[1:]).client_id for _, argv in fl_clients.values())
    assert ids == sorted(c.id for c in FEDERATION.clients)


def test_fl_client_flags_are_accepted_by_its_parser(fl_clients):
    parser = build_parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert fl_clients
    for name, (_, argv) in fl_clients.items():
        for token in argv[1:]:
            if token.startswith("--"):
                flag = token.split("=", 1)[0]
                # argparse would accept an abbreviation; the file must spell flags out.
                assert flag in options, f"{name}: fl-client has no option {flag}"
        try:
            parser.parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"{name}: fl-client rejects {argv[1:]} (exit {exc.code})")


def test_fl_client_ids_buckets_and_data_match_the_federation(services, fl_clients):
    federations = {spec.federation: spec for spec in load_federations(REPO / "federations")}
    for name, (service, argv) in fl_clients.items():
        args = build_parser().parse_args(argv[1:])
        assert args.federation in federations, f"{name}: no federation file for {args.federation}"
        spec = federations[args.federation]
        client = spec.client(args.client_id)  # KeyError: not a client of the federation
        assert args.bucket == client.bucket, f"{name}: bucket {args.bucket} != {client.bucket}"
        assert BUCKET_URI_PATTERN.match(args.bucket)
        assert args.data == f"/data/{client.id}.parquet", f"{name}: data file {args.data}"
        assert any(target == "/data" for _, target in volume_mounts(service)), f"{name}: /data is not mounted"
        endpoint = urlparse(args.endpoint_url)
        assert endpoint.hostname in services, f"{name}: endpoint {args.endpoint_url} is not a compose service"
        env = environment(service)
        assert env.get("AWS_ACCESS_KEY_ID") == client.id, f"{name}: should use the MinIO user {client.id}"
        assert env.get("AWS_SECRET_ACCESS_KEY"), f"{name}: no secret key"


def test_signing_keys_reach_the_coordinator_and_only_their_own_silo(airflow_services, fl_clients, monkeypatch):
    from fl_airflow.keys import ConnectionKeys

    from fl_tasks.protocol import signing

    assert FEDERATION.security.require_signatures, "the compose federation should exercise signatures"
    keys = {}
    for name, (service, argv) in fl_clients.items():
        client_id = build_parser().parse_args(argv[1:]).client_id
        keys[client_id] = interpolate(environment(service).get("FL_SIGNING_KEY", ""))
        signing.as_key(keys[client_id], f"{name}: FL_SIGNING_KEY")  # set, and long enough
        assert not any(k.startswith("AIRFLOW_CONN_") for k in environment(service)), f"{name} sees connections"
    assert len(set(keys.values())) == len(keys), "every silo needs its own key"
    provider = ConnectionKeys(FEDERATION)
    expected = {signing.airflow_conn_env_var(provider.conn_id(c)): key for c, key in keys.items()}
    for name, service in airflow_services.items():
        env = {k: interpolate(v) for k, v in environment(service).items()}
        assert {k for k in env if k.startswith("AIRFLOW_CONN_")} == set(expected), name
        for variable in expected:
            monkeypatch.setenv(variable, env[variable])
        # What the coordinator's key provider reads through Airflow is each silo's key.
        assert {c: provider(c) for c in keys} == {c: key.encode() for c, key in keys.items()}, name


# --- MinIO buckets, users, policies -------------------------------------------------------

def test_minio_init_creates_every_bucket(services):
    created = set(re.findall(r"mc mb --ignore-existing local/(\S+)", minio_init_script(services)))
    expected = {FEDERATION.coordinator_bucket} | {c.bucket_name for c in FEDERATION.clients}
    assert expected <= created, f"missing buckets: {expected - created}"
    mlflow_argv = program(services["mlflow"])
    artifacts = mlflow_argv[mlflow_argv.index("--artifacts-destination") + 1]
    assert urlparse(artifacts).netloc in created


def test_minio_init_grants_each_user_its_policy_file(services):
    script = minio_init_script(services)
    # `grant USER SECRET` creates the policy /policies/USER.json, the user, and attaches one to the other.
    assert re.search(r'mc admin policy create local "\$1" "/policies/\$1\.json"', script)
    assert re.search(r'mc admin user add local "\$1" "\$2"', script)
    assert re.search(r'mc admin policy attach local "\$1" --user "\$1"', script)
    mounts = dict((t, s) for s, t in volume_mounts(services["minio-init"]))
    assert repo_path(mounts["/policies"]) == REPO / "deploy" / "minio" / "policies"
    users = granted_users(services)
    init_env = environment(services["minio-init"])
    for user, variable in users.items():
        assert (REPO / "deploy" / "minio" / "policies" / f"{user}.json").is_file(), f"no policy for {user}"
        assert variable in init_env, f"minio-init has no {variable} for {user}"
    # Every service that talks to MinIO does so as a granted user, with the same secret.
    for name, service in services.items():
        env = environment(service)
        if name == "minio-init" or "AWS_ACCESS_KEY_ID" not in env:
            continue
        user = env["AWS_ACCESS_KEY_ID"]
        assert user in users, f"{name}: MinIO user {user} is never created by minio-init"
        assert env["AWS_SECRET_ACCESS_KEY"] == init_env[users[user]], f"{name}: secret differs from minio-init's"


def test_each_client_policy_grants_only_its_own_bucket():
    for client in FEDERATION.clients:
        assert buckets_granted(policy_of(client.id)) == {client.bucket_name}, client.id


def test_coordinator_and_mlflow_policies(services, airflow_services):
    coordinator_user = {environment(s)["AWS_ACCESS_KEY_ID"] for s in airflow_services.values()}
    assert len(coordinator_user) == 1
    expected = {FEDERATION.coordinator_bucket} | {c.bucket_name for c in FEDERATION.clients}
    assert buckets_granted(policy_of(coordinator_user.pop())) == expected
    mlflow_argv = program(services["mlflow"])
    artifacts = urlparse(mlflow_argv[mlflow_argv.index("--artifacts-destination") + 1]).netloc
    assert buckets_granted(policy_of(environment(services["mlflow"])["AWS_ACCESS_KEY_ID"])) == {artifacts}


# --- environment variables ----------------------------------------------------------------

def _names_read_by(paths: list[Path]) -> set[str]:
    pattern = re.compile(r"""(?:environ\.get|getenv|environ\[|environ\.setdefault)\(?\s*["']([A-Z][A-Z0-9_]+)["']""")
    return {name for path in paths for name in pattern.findall(path.read_text())}


def test_fl_and_mlflow_variables_are_ones_the_code_reads(services):
    ours = _names_read_by([p for d in ("fl_tasks", "dags", "plugins") for p in (REPO / d).rglob("*.py")])
    assert {"FL_S3_ENDPOINT_URL", "FL_FEDERATIONS_DIR", "FL_DATA_CACHE"} <= ours  # the scan works
    # MLFLOW_* variables are read by MLflow itself; its source declares each one it reads.
    mlflow_dir = Path(importlib.util.find_spec("mlflow").origin).parent
    mlflows = set(re.findall(r"""["'](MLFLOW_[A-Z0-9_]+)["']""", (mlflow_dir / "environment_variables.py").read_text()))
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"} <= mlflows
    for name, service in services.items():
        for key in environment(service):
            if key.startswith("FL_"):
                assert key in ours, f"{name}: {key} is read nowhere in fl_tasks/, dags/ or plugins/"
            elif key.startswith("MLFLOW_"):
                assert key in ours | mlflows, f"{name}: {key} is not an MLflow variable"


def test_airflow_services_reach_minio_mlflow_and_the_federations(services, airflow_services):
    for name, service in airflow_services.items():
        env = {k: interpolate(v) for k, v in environment(service).items()}
        for key in ("FL_S3_ENDPOINT_URL", "FL_FEDERATIONS_DIR", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            assert env.get(key), f"{name}: {key} is not set"
        assert env["FL_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        mounts = {target: source for source, target in volume_mounts(service)}
        assert repo_path(mounts.get(env["FL_FEDERATIONS_DIR"], "/nowhere")) == REPO / "federations", \
            f"{name}: FL_FEDERATIONS_DIR is not where ./federations is mounted"
        assert repo_path(mounts["/opt/airflow/dags"]) == REPO / "dags"
        assert repo_path(mounts["/opt/airflow/plugins"]) == REPO / "plugins"


# --- Airflow ------------------------------------------------------------------------------

def _airflow_invocations(name: str, service: dict) -> list[list[str]]:
    """Every `airflow ...` command line the service runs (entrypoint-prefixed or explicit)."""
    argv = program(service)
    found = []
    if argv[:2] in (["/bin/bash", "-c"], ["bash", "-c"]):
        if name == "airflow-init":
            found += [shlex.split(m) for m in re.findall(r"/entrypoint airflow ([^\n>|&;]+)", argv[2])]
    elif argv:
        found.append(argv[1:] if argv[0] == "airflow" else argv)
    test = (service.get("healthcheck") or {}).get("test") or []
    if test[:1] == ["CMD-SHELL"]:
        for part in re.split(r"\|\||&&", interpolate(test[1])):
            words = shlex.split(part)
            if words[:1] == ["airflow"]:
                found.append(words[1:])
    return found


def test_airflow_commands_are_airflow_3_subcommands(airflow_services):
    from airflow.cli.cli_parser import get_parser

    parser = get_parser()
    seen = set()
    for name, service in airflow_services.items():
        for args in _airflow_invocations(name, service):
            seen.add(" ".join(args[:2]) if args[0] == "celery" else args[0])
            if args[0] == "celery":
                assert args[1] in CELERY_SUBCOMMANDS, f"{name}: no such command: airflow celery {args[1]}"
                continue
            try:
                parser.parse_args(args)
            except SystemExit as exc:
                pytest.fail(f"{name}: `airflow {' '.join(args)}` is not an Airflow 3 command (exit {exc.code})")
    assert AIRFLOW_COMPONENTS <= seen, f"missing components: {AIRFLOW_COMPONENTS - seen}"
    assert "version" in seen


def test_airflow_common_settings(services, airflow_services):
    assert {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
            "airflow-triggerer", "airflow-init"} <= set(airflow_services)
    for name, service in airflow_services.items():
        env = environment(service)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert urlparse(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).scheme == "postgresql+psycopg2"
        assert urlparse(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).hostname in services
        assert urlparse(env["AIRFLOW__CELERY__BROKER_URL"]).scheme == "redis"
        assert urlparse(env["AIRFLOW__CELERY__BROKER_URL"]).hostname in services
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert program(services["airflow-apiserver"]) == ["api-server"]
    init_env = environment(services["airflow-init"])
    assert init_env.get("_AIRFLOW_DB_MIGRATE") == "true"  # the entrypoint runs `airflow db migrate`


# --- wiring between services --------------------------------------------------------------

def test_depends_on_conditions_are_satisfiable(services):
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        depends = {d: {"condition": "service_started"} for d in depends} if isinstance(depends, list) else depends
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{name} waits for {dep} to exit; it restarts"


def test_long_running_services_have_healthchecks(services):
    for name in ("postgres", "redis", "minio", "mlflow", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-worker", "airflow-triggerer"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_published_ports_are_bound_to_loopback(services):
    for name, service in services.items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port} is not bound to 127.0.0.1"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is not bound to 127.0.0.1"


def test_mlflow_uses_its_own_postgres_database_and_minio(services):
    argv = program(services["mlflow"])
    assert argv[:2] == ["mlflow", "server"]
    store = urlparse(interpolate(argv[argv.index("--backend-store-uri") + 1]))
    assert store.scheme.startswith("postgresql") and store.hostname in services and store.path == "/mlflow"
    postgres_env = {k: interpolate(v) for k, v in environment(services["postgres"]).items()}
    assert store.username == "mlflow" and store.password == postgres_env["POSTGRES_MLFLOW_PASSWORD"]
    init_sql = "\n".join(p.read_text() for p in (REPO / "deploy" / "postgres").glob("*.sh"))
    assert "CREATE ROLE mlflow" in init_sql and "CREATE DATABASE mlflow OWNER mlflow" in init_sql
    assert any(target == "/docker-entrypoint-initdb.d" for _, target in volume_mounts(services["postgres"]))
    env = environment(services["mlflow"])
    assert urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).hostname in services
    assert argv[argv.index("--artifacts-destination") + 1].startswith("s3://")


# --- what each service listens on, and every URL that names one ---------------------------

# Images that fix their server port themselves (the command line does not set it): the
# official postgres image listens on 5432, the redis image on 6379 unless its command passes
# `--port`. `minio server` listens on --address (default :9000) and, only when
# --console-address is given, on that console port (otherwise on a random one). The mc image
# runs a client and listens on nothing.
IMAGE_PORTS = {"postgres": 5432, "redis": 6379, "mc": None}
MINIO_DEFAULT_ADDRESS = ":9000"

# Options of the providers the apache/airflow image ships but the venv does not install (see
# CELERY_SUBCOMMANDS): [celery] of apache-airflow-providers-celery, with the defaults that
# matter here. Airflow's own options come from Airflow's configuration description.
IMAGE_PROVIDER_OPTIONS = {
    "celery": {"broker_url": None, "result_backend": None, "flower_host": "0.0.0.0", "flower_port": "5555",
               "flower_url_prefix": "", "flower_basic_auth": "", "worker_concurrency": "16",
               "celery_app_name": "airflow.providers.celery.executors.celery_executor"},
}
# Python packages of those providers: modules under them exist in the image, not in the venv.
IMAGE_PROVIDER_PACKAGES = ("airflow.providers.celery", "airflow.providers.fab")

ALL_INTERFACES = {"", "0.0.0.0", "::", "[::]"}
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
# The port a URL implies when it names none (`db+` and `+driver` are Celery/SQLAlchemy decorations).
SCHEME_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "redis": 6379}
# Hosts outside the stack that the file may name: the Airflow documentation airflow-init prints.
EXTERNAL_HOSTS = {"airflow.apache.org"}
# s3://BUCKET names a bucket, not a host.
NOT_NETWORK_SCHEMES = {"s3"}

_URL = re.compile(r"""\b[a-z][a-z0-9+.-]*://[^\s"'<>,;|]+""")


@functools.cache
def airflow_config_description() -> dict:
    from airflow.configuration import retrieve_configuration_description

    return retrieve_configuration_description(include_providers=True)


def airflow_option(env: dict[str, str], section: str, key: str) -> str | None:
    """The value an Airflow component sees: its AIRFLOW__S__K variable, else the option's default."""
    variable = f"AIRFLOW__{section.upper()}__{key.upper()}"
    if variable in env:
        return interpolate(env[variable])
    if section in IMAGE_PROVIDER_OPTIONS:
        return IMAGE_PROVIDER_OPTIONS[section][key]
    return airflow_config_description()[section]["options"][key]["default"]


def flag_value(argv: list[str], *names: str) -> str | None:
    for i, token in enumerate(argv):
        for name in names:
            if token == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and token.startswith(f"{name}="):
                return token.split("=", 1)[1]
    return None


def image_name(service: dict) -> str:
    """`quay.io/minio/minio:RELEASE...` -> `minio`."""
    return interpolate(service.get("image", "")).split("/")[-1].split(":")[0]


def service_kind(service: dict) -> str | None:
    """What a service runs: an image name, an Airflow component, `mlflow`, or None."""
    argv = program(service)
    if "build" not in service:
        return image_name(service)
    if "AIRFLOW__CORE__EXECUTOR" in environment(service):
        argv = argv[1:] if argv[:1] == ["airflow"] else argv
        return " ".join(argv[:2]) if argv[:1] == ["celery"] else (argv[0] if argv else None)
    if argv[:2] == ["mlflow", "server"]:
        return "mlflow"
    return None


def host_and_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def listening(service: dict) -> dict[int, str]:
    """port -> address it is bound to ('' or 0.0.0.0: every interface)."""
    argv, env, kind = program(service), environment(service), service_kind(service)
    if "build" not in service:
        if kind == "minio":
            assert argv[:1] == ["server"], argv
            addresses = [flag_value(argv, "--address") or MINIO_DEFAULT_ADDRESS, flag_value(argv, "--console-address")]
            return {port: host for host, port in (host_and_port(a) for a in addresses if a)}
        assert kind in IMAGE_PORTS, f"no known ports for image {kind}: add it to IMAGE_PORTS"
        if IMAGE_PORTS[kind] is None:
            return {}
        return {int(flag_value(argv, "--port") or IMAGE_PORTS[kind]): ""}
    args = argv[1:] if argv[:1] == ["airflow"] else argv
    if kind == "api-server":
        port = flag_value(args, "-p", "--port") or airflow_option(env, "api", "port")
        return {int(port): flag_value(args, "-H", "--host") or airflow_option(env, "api", "host")}
    if kind == "scheduler":
        if str(airflow_option(env, "scheduler", "enable_health_check")).lower() != "true":
            return {}
        return {int(airflow_option(env, "scheduler", "scheduler_health_check_server_port")):
                airflow_option(env, "scheduler", "scheduler_health_check_server_host")}
    if kind in ("celery worker", "triggerer"):  # each serves its task logs unless told not to
        if "--skip-serve-logs" in args:
            return {}
        key = "worker_log_server_port" if kind == "celery worker" else "trigger_log_server_port"
        return {int(airflow_option(env, "logging", key)): ""}
    if kind == "celery flower":
        port = flag_value(args, "-p", "--port") or airflow_option(env, "celery", "flower_port")
        return {int(port): flag_value(args, "-H", "--hostname") or airflow_option(env, "celery", "flower_host")}
    if kind == "mlflow":
        import mlflow.cli

        defaults = {p.name: p.default for p in mlflow.cli.server.params}
        port = flag_value(argv, "-p", "--port") or defaults["port"]
        return {int(port): flag_value(argv, "-h", "--host") or defaults["host"]}
    return {}


@functools.cache
def http_routes(kind: str) -> set[str]:
    """Paths the server of this kind answers (besides `/`), from the server's own code."""
    if kind == "api-server":
        from airflow.api_fastapi.app import RESERVED_URL_PREFIXES
        from airflow.api_fastapi.core_api.routes.public import public_router

        assert "/execution" in RESERVED_URL_PREFIXES  # the Task Execution API is mounted there
        return {route.path for route in public_router.routes} | {"/execution/"}
    if kind == "scheduler":  # the health check server (scheduler_health.HealthServer)
        source = Path(importlib.util.find_spec("airflow.utils.scheduler_health").origin).read_text()
        return set(re.findall(r'self\.path == "([^"]+)"', source))
    if kind == "mlflow":
        from mlflow.server import app

        return {rule.rule for rule in app.url_map.iter_rules()}
    return set()


def service_texts(service: dict) -> list[str]:
    """Every string a container runs or reads: environment values, entrypoint, command, healthcheck."""
    texts = list(environment(service).values())
    texts += as_argv(service.get("entrypoint")) + as_argv(service.get("command"))
    texts += [str(t) for t in (service.get("healthcheck") or {}).get("test") or []]
    return [interpolate(t) for t in texts]


def urls_in(service: dict) -> list[str]:
    return [url.rstrip(".") for text in service_texts(service) for url in _URL.findall(text)]


def url_port(url) -> int:
    if url.port:
        return url.port
    known = [SCHEME_PORTS[part] for part in url.scheme.split("+") if part in SCHEME_PORTS]
    assert known, f"no default port known for scheme {url.scheme}: add it to SCHEME_PORTS"
    return known[0]


def published_ports(service: dict) -> list[tuple[str, int | None, int]]:
    """(host ip, host port, container port) of every `ports:` entry."""
    found = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            published = port.get("published")
            found.append((port.get("host_ip", ""), int(published) if published else None, int(port["target"])))
            continue
        parts = interpolate(port).split("/")[0].split(":")
        assert "-" not in parts[-1], f"port range {port}: list the ports one by one"
        found.append((":".join(parts[:-2]), int(parts[-2]) if len(parts) > 1 else None, int(parts[-1])))
    return found


def test_listening_ports_are_derived_from_the_commands(services):
    """The table the URL checks rely on, as the file stands (and a sanity check of `listening`)."""
    assert listening(services["postgres"]) == {5432: ""}
    assert listening(services["redis"]) == {6379: ""}
    assert set(listening(services["minio"])) == {9000, 9001}
    assert listening(services["mlflow"]) == {5000: "0.0.0.0"}
    assert listening(services["airflow-apiserver"]) == {8080: "0.0.0.0"}
    assert set(listening(services["airflow-scheduler"])) == {8974}
    for name in ("minio-init", "airflow-init", "airflow-dag-processor", "fl-silo-data", "fl-client-bank-north"):
        assert listening(services[name]) == {}, name


def test_every_url_names_a_service_and_a_port_it_listens_on(services):
    listens = {name: listening(service) for name, service in services.items()}
    checked = set()
    for name, service in services.items():
        for text in urls_in(service):
            url = urlparse(text)
            if url.scheme in NOT_NETWORK_SCHEMES:
                continue
            if url.hostname in EXTERNAL_HOSTS:
                assert url.scheme == "https", f"{name}: {text}"
                continue
            target = name if url.hostname in LOOPBACK_HOSTS else url.hostname
            assert target in services, f"{name}: {text}: {url.hostname} is not a compose service"
            port, ports = url_port(url), listens[target]
            assert port in ports, \
                f"{name}: {text}: {target} listens on {sorted(ports) or 'no port'}, not on {port}"
            if target != name:
                assert ports[port] in ALL_INTERFACES, \
                    f"{name}: {text}: {target} listens on {port} only on {ports[port]}, out of other containers' reach"
            if url.scheme in ("http", "https") and url.path not in ("", "/"):
                routes = http_routes(service_kind(services[target]))
                assert url.path in routes, f"{name}: {text}: {target} serves no {url.path}"
            checked.add((name, target, port))
    # The ones the stack depends on were seen (so the scan itself works).
    assert {("airflow-scheduler", "minio", 9000), ("airflow-scheduler", "mlflow", 5000),
            ("airflow-worker", "airflow-apiserver", 8080), ("airflow-worker", "postgres", 5432),
            ("airflow-worker", "redis", 6379), ("mlflow", "minio", 9000), ("mlflow", "postgres", 5432),
            ("minio-init", "minio", 9000), ("fl-client-bank-north", "minio", 9000),
            ("airflow-scheduler", "airflow-scheduler", 8974), ("mlflow", "mlflow", 5000)} <= checked


def test_published_and_exposed_ports_are_ones_the_service_listens_on(services):
    host_ports = {}
    for name, service in services.items():
        ports = listening(service)
        exposed = [(None, None, int(str(p).split("/")[0])) for p in service.get("expose") or []]
        for _, host_port, container_port in published_ports(service) + exposed:
            assert container_port in ports, \
                f"{name}: publishes {container_port}, but listens on {sorted(ports) or 'no port'}"
            assert ports[container_port] in ALL_INTERFACES, \
                f"{name}: {container_port} is bound to {ports[container_port]}, Docker cannot forward to it"
            if host_port is not None:
                assert host_port not in host_ports, f"{name} and {host_ports[host_port]} both publish {host_port}"
                host_ports[host_port] = name
    assert {8080, 5000, 9000, 9001} <= set(host_ports)


def test_mlflow_allowed_hosts_cover_every_way_it_is_reached(services):
    from mlflow.server.security_utils import is_allowed_host_header

    mlflow = services["mlflow"]
    allowed = flag_value(program(mlflow), "--allowed-hosts").split(",")
    ports = set(listening(mlflow)) | {host_port for _, host_port, _ in published_ports(mlflow) if host_port}
    reached = set()  # Host headers: other containers by service name, a browser on the host via 127.0.0.1
    for name, service in services.items():
        for text in urls_in(service):
            url = urlparse(text)
            if url.hostname == "mlflow" or (name == "mlflow" and url.hostname in LOOPBACK_HOSTS):
                reached.add(url.netloc.rpartition("@")[2])
    reached |= {f"{host}:{port}" for _, port, _ in published_ports(mlflow) for host in ("127.0.0.1", "localhost")}
    assert "mlflow:5000" in reached
    for host in reached:
        assert is_allowed_host_header(allowed, host), f"MLflow rejects requests with Host: {host} ({allowed})"
    for entry in allowed:
        host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "")
        assert host in services or host in LOOPBACK_HOSTS, f"--allowed-hosts {entry}: unknown host"
        assert not port or "*" in port or int(port) in ports, f"--allowed-hosts {entry}: mlflow is not on {port}"


# --- Python modules and executables ---------------------------------------------------------

def _python_invocations(services) -> list[tuple[str, str, str]]:
    """(service, '-m' or '-c', module or code) of every `python -m X` / `python -c CODE`."""
    found = []
    for name, service in services.items():
        argvs = [program(service)]
        for text in service_texts(service):  # shell scripts: bash -c / sh -c / CMD-SHELL
            for line in text.splitlines():
                if "python" in line:
                    try:
                        argvs.append(shlex.split(line))
                    except ValueError:
                        pass
        for argv in argvs:
            for i, token in enumerate(argv[:-2]):
                if re.fullmatch(r"(\S*/)?python3?(\.\d+)?", token) and argv[i + 1] in ("-m", "-c"):
                    found.append((name, argv[i + 1], argv[i + 2]))
    return list(dict.fromkeys(found))


def module_exists(module: str) -> bool:
    if module.startswith(IMAGE_PROVIDER_PACKAGES):
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _check_imports(code: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            problems += [f"no module {a.name}" for a in node.names if not module_exists(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if not module_exists(node.module):
                problems.append(f"no module {node.module}")
            elif not node.module.startswith(IMAGE_PROVIDER_PACKAGES):
                imported = importlib.import_module(node.module)
                problems += [f"{node.module} has no {a.name}" for a in node.names
                             if not hasattr(imported, a.name) and not module_exists(f"{node.module}.{a.name}")]
    return problems


def test_python_modules_it_runs_exist(services):
    invocations = _python_invocations(services)
    assert ("fl-silo-data", "-c") in {(name, flag) for name, flag, _ in invocations}  # the scan works
    for name, flag, value in invocations:
        if flag == "-m":
            assert module_exists(value), f"{name}: python -m {value}: no such module"
        else:
            assert not _check_imports(value), f"{name}: python -c: {_check_imports(value)}"
    # `celery --app MODULE.app` in the worker's healthcheck: the first, Airflow 3 alternative.
    test = services["airflow-worker"]["healthcheck"]["test"][1]
    app = flag_value(shlex.split(test.split("||")[0]), "--app")
    assert app.startswith("airflow.providers.celery."), f"airflow-worker: celery --app {app} is not Airflow 3's"


def test_auth_manager_and_executor_exist(airflow_services):
    from airflow.executors.executor_constants import CORE_EXECUTOR_NAMES

    for name, service in airflow_services.items():
        env = environment(service)
        assert env["AIRFLOW__CORE__EXECUTOR"] in CORE_EXECUTOR_NAMES, name
        module = env["AIRFLOW__CORE__AUTH_MANAGER"].rsplit(".", 1)[0]
        assert module_exists(module), f"{name}: no module {module} for AIRFLOW__CORE__AUTH_MANAGER"


# Executables the images provide (checked nowhere else): the tools of each stock image, and
# what the apache/airflow base image adds to our image (curl, bash, the entrypoint, celery).
IMAGE_TOOLS = {
    "postgres": {"pg_isready"}, "redis": {"redis-cli"}, "minio": {"mc"}, "mc": {"mc", "/bin/sh"},
    "built": {"curl", "bash", "/bin/bash", "/bin/sh", "/entrypoint", "celery", "python", "/usr/bin/dumb-init"},
}


def test_executables_it_runs_exist(services):
    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    venv_bin = Path(sys.executable).parent
    for name, service in services.items():
        image = "built" if "build" in service else image_name(service)
        commands = as_argv(service.get("entrypoint"))[:1]
        argv = program(service)
        test = (service.get("healthcheck") or {}).get("test") or []
        if test[:1] == ["CMD"]:
            commands.append(test[1])
        elif test[:1] == ["CMD-SHELL"]:
            commands += [shlex.split(part)[0] for part in re.split(r"\|\||&&", interpolate(test[1]))]
        if "build" in service and "AIRFLOW__CORE__EXECUTOR" not in environment(service):
            commands += argv[:1]  # Airflow components' commands go through the entrypoint (checked above)
        for command in commands:
            known = IMAGE_TOOLS[image] | {"airflow"} if image == "built" else IMAGE_TOOLS[image]
            assert command in known or (image == "built" and (command in scripts or (venv_bin / command).exists())), \
                f"{name}: {command} is neither a project script, a venv program nor a tool of image {image}"


# --- demo data and federations ----------------------------------------------------------------

def _literal(node):
    """A string literal, or Path("...") / str("...") of one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Path", "str"):
        return _literal(node.args[0])
    return None


def container_to_host(service: dict, path: str) -> tuple[str, str]:
    """(mount source, path below it) of a container path."""
    for source, target in sorted(volume_mounts(service), key=lambda m: -len(m[1])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source, path[len(target):].lstrip("/")
    pytest.fail(f"{path} is not on any mount")


def test_silo_data_job_writes_the_files_each_fl_client_reads(services, fl_clients):
    from fl_tasks.simulation.simulate import prepare_silos

    silo = services["fl-silo-data"]
    argv = program(silo)
    assert argv[:2] == ["python", "-c"]
    calls = [n for n in ast.walk(ast.parse(argv[2])) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    prepare = next(c for c in calls if c.func.id == "prepare_silos")
    load = next(c for c in calls if c.func.id == "load_federation")
    publish = next(c for c in calls if c.func.id == "publish_validation")
    assert prepare in ast.walk(publish)  # the coordinator's validation rows go to its bucket
    assert silo["environment"]["AWS_ACCESS_KEY_ID"] == "fl-coordinator"
    federation_file, state_dir = _literal(load.args[0]), _literal(prepare.args[1])
    assert federation_file and state_dir
    # The federation file is the repository's, mounted.
    source, below = container_to_host(silo, federation_file)
    assert is_host_path(source) and (repo_path(source) / below).is_file(), f"{federation_file} is not in the repo"
    spec = load_federation(repo_path(source) / below)
    # prepare_silos writes <state_dir>/silos/<client id>.parquet ...
    code = inspect.getsource(prepare_silos)
    assert 'state_dir / "silos"' in code and 'f"{client.id}.parquet"' in code
    volume, below = container_to_host(silo, f"{state_dir}/silos")
    assert volume and not is_host_path(volume) and below == "", f"{state_dir}/silos is not the root of a volume"
    # ... into the volume each fl-client reads its --data from, once the job has finished.
    assert sorted(build_parser().parse_args(a[1:]).client_id for _, a in fl_clients.values()) == \
        sorted(c.id for c in spec.clients)
    for name, (service, argv) in fl_clients.items():
        args = build_parser().parse_args(argv[1:])
        assert args.federation == spec.federation, f"{name}: --federation {args.federation} != {spec.federation}"
        assert container_to_host(service, args.data) == (volume, f"{args.client_id}.parquet"), \
            f"{name}: --data {args.data} is not the file fl-silo-data writes for it"
        assert service["depends_on"]["fl-silo-data"]["condition"] == "service_completed_successfully", name


def test_fl_data_cache_is_a_volume_where_it_is_set(services):
    for name, service in services.items():
        cache = environment(service).get("FL_DATA_CACHE")
        if cache:
            source, below = container_to_host(service, cache)
            assert source and not is_host_path(source) and below == "", f"{name}: FL_DATA_CACHE {cache} is not a volume"


# --- environment variables: each is read by something ------------------------------------------

# Variables the images' entrypoints read: apache/airflow (docs: docker-stack/entrypoint.html;
# DUMB_INIT_SETSID is dumb-init's), postgres and minio (their image documentation).
IMAGE_ENTRYPOINT_VARIABLES = {
    "built": {"_AIRFLOW_DB_MIGRATE", "_AIRFLOW_WWW_USER_CREATE", "_AIRFLOW_WWW_USER_USERNAME",
              "_AIRFLOW_WWW_USER_PASSWORD", "_PIP_ADDITIONAL_REQUIREMENTS", "CONNECTION_CHECK_MAX_COUNT",
              "DUMB_INIT_SETSID"},
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
}


@functools.cache
def _source_of(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text()


def _read_by_library(key: str) -> bool:
    if key.startswith("AWS_"):
        return any(f"'{key}'" in _source_of(m) or f'"{key}"' in _source_of(m)
                   for m in ("botocore.credentials", "botocore.configprovider"))
    if key.startswith("PYTHON"):
        help_env = subprocess.run([sys.executable, "--help-env"], capture_output=True, text=True).stdout
        return re.search(rf"^{key}\b", help_env, re.M) is not None
    if key == "AIRFLOW_CONFIG":
        return "AIRFLOW_CONFIG" in _source_of("airflow.configuration")
    if key.startswith("AIRFLOW_CONN_"):  # connections, read by Airflow's environment secrets backend
        return 'CONN_ENV_PREFIX = "AIRFLOW_CONN_"' in _source_of("airflow.secrets.environment_variables")
    return False


def _scripts_of(service: dict) -> str:
    """The service's own shell: its command/entrypoint and the scripts of its host-mounted folders."""
    text = "\n".join(as_argv(service.get("entrypoint")) + as_argv(service.get("command")))
    for source, _ in volume_mounts(service):
        if is_host_path(source) and repo_path(source).is_dir():
            text += "\n".join(p.read_text() for p in repo_path(source).glob("*.sh"))
    return text.replace("$$", "$")


def test_every_environment_variable_is_read_by_something(services):
    for name, service in services.items():
        image = "built" if "build" in service else image_name(service)
        scripts = _scripts_of(service)
        for key in environment(service):
            if key.startswith(("AIRFLOW__", "FL_", "MLFLOW_")):
                continue  # checked against Airflow's options and the code above / below
            read = (key in IMAGE_ENTRYPOINT_VARIABLES.get(image, set()) or _read_by_library(key)
                    or re.search(rf"\$\{{?{key}\b", scripts))
            assert read, f"{name}: nothing reads {key}"


# --- Airflow options: real, current names; consistent with the local stack ---------------------

@pytest.fixture(scope="module")
def local_stack_env(tmp_path_factory) -> dict[str, str]:
    """The environment `make stack` (fl_tasks/localstack.py) gives its Airflow processes."""
    from devstack.localstack import LocalStack

    return LocalStack(tmp_path_factory.mktemp("stack"), REPO / "federations").env()


def _airflow_variables_of_local_stack(local_stack_env) -> set[str]:
    """The local stack's AIRFLOW__ variables, and any other the project's code names."""
    sources = [*(REPO / "fl_tasks").glob("*.py"), *(REPO / "scripts").glob("*.py")]
    named = {m for p in sources for m in re.findall(r"""["'](AIRFLOW__[A-Z0-9_.]+__[A-Z0-9_]+)["']""", p.read_text())}
    return named | {k for k in local_stack_env if k.startswith("AIRFLOW__")}


def _option_problem(variable: str) -> str | None:
    from airflow.configuration import conf

    section, key = (part.lower() for part in variable[len("AIRFLOW__"):].split("__", 1))
    known = {s: set(v["options"]) for s, v in airflow_config_description().items()}
    for s, options in IMAGE_PROVIDER_OPTIONS.items():
        known.setdefault(s, set()).update(options)
    renamed = {(old_s, old_k): f"[{new_s}] {new_k}"
               for (new_s, new_k), (old_s, old_k, _) in conf.deprecated_options.items()}
    if (section, key) in renamed:
        return f"{variable} is deprecated: Airflow 3 calls it {renamed[(section, key)]}"
    base = re.sub(r"_(cmd|secret)$", "", key)
    if key not in known.get(section, set()) and base not in known.get(section, set()):
        return f"{variable}: Airflow has no option [{section}] {key}"
    return None


def test_airflow_variables_are_current_airflow_options(services, local_stack_env):
    compose_variables = {k for s in services.values() for k in environment(s) if k.startswith("AIRFLOW__")}
    local_variables = _airflow_variables_of_local_stack(local_stack_env)
    shared = compose_variables & local_variables
    assert {"AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__API_AUTH__JWT_SECRET"} <= shared
    problems = [p for v in sorted(compose_variables | local_variables) if (p := _option_problem(v))]
    assert not problems, problems
    assert _option_problem("AIRFLOW__WEBSERVER__WEB_SERVER_PORT")  # Airflow 2's name is caught
    assert _option_problem("AIRFLOW__CORE__EXECUTER")


def test_airflow_settings_consistent_with_the_local_stack(services, airflow_services, local_stack_env):
    """What Airflow 3 needs of every component, the local stack (fl_tasks/localstack.py) sets too."""
    # The execution API the task processes call: the api-server's /execution/ mount, on the
    # port the api-server listens on, in both stacks (compose's port: see the URL test).
    local = urlparse(local_stack_env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert local.path == "/execution/" and local.path in http_routes("api-server")
    assert local.port == int(airflow_option(local_stack_env, "api", "port"))
    values = {name: {k: interpolate(v) for k, v in environment(s).items() if k.startswith("AIRFLOW__")}
              for name, s in airflow_services.items()}
    for key in ("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__API_AUTH__JWT_SECRET",
                "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__AUTH_MANAGER"):
        assert len({v.get(key) for v in values.values()}) == 1, f"{key} differs between Airflow components"
        assert key in values["airflow-scheduler"], f"{key} is not set"
    assert urlparse(values["airflow-worker"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).path == "/execution/"
    # Each stack creates its admin the way its auth manager expects: SimpleAuthManager (local
    # stack) from SIMPLE_AUTH_MANAGER_* options, FAB (compose, as the official file) from the
    # entrypoint's _AIRFLOW_WWW_USER_* (`airflow users create` is a FAB command).
    manager = values["airflow-scheduler"]["AIRFLOW__CORE__AUTH_MANAGER"]
    init_env = environment(services["airflow-init"])
    if manager.endswith("FabAuthManager"):
        assert init_env.get("_AIRFLOW_WWW_USER_CREATE") == "true"
        assert not any("SIMPLE_AUTH_MANAGER" in k for v in values.values() for k in v)
    else:
        assert "_AIRFLOW_WWW_USER_CREATE" not in init_env
