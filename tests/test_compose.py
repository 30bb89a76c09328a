"""Static checks of docker-compose.yaml and Dockerfile (no Docker engine needed).

The stack cannot be started here, so these tests check what can go wrong before `docker
compose up`: the file against the Compose specification, every path it mounts or copies,
the `fl-client` flags against the real argparse parser, the client ids and buckets against
federations/banks.yaml, the environment variables against the code that reads them, the
Airflow commands against Airflow's own CLI parser, the MinIO users and policies, and that
every published port stays on 127.0.0.1.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from fl_tasks.client import build_parser
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
        assert args.data == f"/data/{client.id}.npz", f"{name}: data file {args.data}"
        assert any(target == "/data" for _, target in volume_mounts(service)), f"{name}: /data is not mounted"
        endpoint = urlparse(args.endpoint_url)
        assert endpoint.hostname in services, f"{name}: endpoint {args.endpoint_url} is not a compose service"
        env = environment(service)
        assert env.get("AWS_ACCESS_KEY_ID") == client.id, f"{name}: should use the MinIO user {client.id}"
        assert env.get("AWS_SECRET_ACCESS_KEY"), f"{name}: no secret key"


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
