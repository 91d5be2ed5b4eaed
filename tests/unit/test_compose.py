"""docker-compose.yml, the Dockerfile and .dockerignore, checked against the code they drive.

There is no Docker engine here, so the files are parsed and their values fed to lcmq itself:
the settings they set, the commands they run, the bucket they create, the hosts they name.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from lcmq.cli import build_parser
from lcmq.profiles import BUILTIN_PROFILES
from lcmq.repository import normalize_url
from lcmq.settings import Settings
from lcmq.storage import S3Storage, storage_from_url

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

EXPECTED_SERVICES = {
    "redis",
    "postgres",
    "minio",
    "minio-init",
    "migrate",
    "worker-gpu",
    "worker-cpu",
    "scheduler",
    "flower",
    "api",
}
LCMQ_SERVICES = ("migrate", "worker-gpu", "worker-cpu", "scheduler", "api")
WORKERS = ("worker-gpu", "worker-cpu")
ONE_SHOTS = ("migrate", "minio-init")

# Compose interpolation of values, as if no variable were set: `${VAR:-default}` and
# `${VAR-default}` give the default, `$$` a literal `$`. test_every_variable_has_a_default
# rejects a bare `$VAR` / `${VAR}`, which compose would turn into an empty string.
_INTERPOLATION = re.compile(r"\$\$|\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}")


def _interpolate(value):
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: "$" if m.group(0) == "$$" else m.group(1), value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    return _interpolate(raw_compose)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _argv(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


@pytest.fixture(scope="module")
def lcmq_env(services) -> dict[str, str]:
    return _env(services["migrate"])


@pytest.fixture()
def clean_settings_env(monkeypatch, tmp_path):
    """Settings built from given values only: no LCMQ_* of this process, no lcmq.toml."""
    import os

    for key in [k for k in os.environ if k.startswith("LCMQ_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LCMQ_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.chdir(tmp_path)


# --- compose: shape ---------------------------------------------------------------------


def test_compose_has_the_expected_services(services):
    assert set(services) == EXPECTED_SERVICES


def test_every_variable_has_a_default(raw_compose, compose):
    """An unset `${VAR}` becomes an empty string under compose: every one needs `:-default`."""
    bare = [s for s in _strings(raw_compose) if "$" in _INTERPOLATION.sub("", s)]
    assert bare == []
    assert compose != raw_compose  # the ${LCMQ_MODEL:-...} style defaults were found and substituted


def test_lcmq_services_build_one_image_with_the_shared_env(compose, services):
    shared = {k: str(v) for k, v in compose["x-lcmq-env"].items()}
    for name in LCMQ_SERVICES:
        svc = services[name]
        assert svc.get("build") == ".", name
        assert svc.get("image") == "lcmq:latest", name
        assert _env(svc) == shared, name
        assert _argv(svc)[0] == "lcmq", name


# --- compose: settings ------------------------------------------------------------------


def test_lcmq_env_vars_are_settings_fields(services):
    for name, svc in services.items():
        for key in _env(svc):
            if key.startswith("LCMQ_"):
                assert key[len("LCMQ_") :].lower() in Settings.model_fields, f"{name}: {key} is no lcmq setting"


def test_lcmq_env_values_pass_settings_validation(lcmq_env, clean_settings_env):
    values = {k[len("LCMQ_") :].lower(): v for k, v in lcmq_env.items() if k.startswith("LCMQ_")}
    settings = Settings(**values)
    # The farm must not fall back to the embedded SQLite / filesystem broker / ./renders defaults.
    assert settings.database_url == lcmq_env["LCMQ_DATABASE_URL"]
    assert settings.broker_url == lcmq_env["LCMQ_BROKER_URL"]
    assert not settings.embedded_broker
    assert settings.storage_url == lcmq_env["LCMQ_STORAGE_URL"]
    assert settings.storage_url.startswith("s3://")
    assert settings.s3_endpoint_url == lcmq_env["LCMQ_S3_ENDPOINT_URL"]
    for field, value in values.items():
        assert str(getattr(settings, field)) == value, field


def test_database_url_matches_postgres_and_an_installed_driver(lcmq_env, services):
    from sqlalchemy.engine import make_url

    url = make_url(normalize_url(lcmq_env["LCMQ_DATABASE_URL"]))
    assert url.get_dialect().driver == "psycopg"  # imports the DB-API module lcmq depends on
    pg = _env(services["postgres"])
    assert (url.username, url.password, url.database) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert url.host == "postgres" and url.host in services
    assert (url.port or 5432) == 5432
    healthcheck = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in healthcheck
    assert _flag(shlex.split(healthcheck), "-U") == pg["POSTGRES_USER"]


def test_broker_url_is_the_redis_service_and_flower_watches_it(lcmq_env, services):
    broker = urlparse(lcmq_env["LCMQ_BROKER_URL"])
    assert broker.scheme == "redis"
    assert broker.hostname == "redis" and broker.hostname in services
    assert (broker.port or 6379) == 6379
    assert _env(services["flower"])["CELERY_BROKER_URL"] == lcmq_env["LCMQ_BROKER_URL"]
    flower_argv = _argv(services["flower"])
    assert "flower" in flower_argv and "--port=5555" in flower_argv
    assert any(str(p).endswith("5555:5555") for p in services["flower"]["ports"])


def test_url_hosts_are_service_names(services):
    hosts = []
    for name, svc in services.items():
        for key, value in _env(svc).items():
            parsed = urlparse(value)
            if parsed.scheme in ("postgresql", "postgres", "redis", "http", "https"):
                hosts.append((name, key, parsed.hostname))
    assert {key for _, key, _ in hosts} >= {
        "LCMQ_DATABASE_URL",
        "LCMQ_BROKER_URL",
        "LCMQ_S3_ENDPOINT_URL",
        "CELERY_BROKER_URL",
        "MC_HOST_local",
    }
    for name, key, host in hosts:
        assert host in services, f"{name}: {key} names host {host!r}, which is no service"


# --- compose: object storage ------------------------------------------------------------


def test_minio_init_creates_the_storage_bucket(lcmq_env, services):
    storage = storage_from_url(
        lcmq_env["LCMQ_STORAGE_URL"], lcmq_env["LCMQ_S3_ENDPOINT_URL"], lcmq_env["LCMQ_S3_REGION"]
    )
    assert isinstance(storage, S3Storage)
    argv = _argv(services["minio-init"])
    assert argv[0] == "mb" and "--ignore-existing" in argv  # idempotent on a second `up`
    alias, _, bucket = argv[-1].partition("/")
    assert bucket == storage.bucket
    assert f"MC_HOST_{alias}" in _env(services["minio-init"])
    assert services["minio-init"]["image"].startswith("minio/mc")


def test_minio_credentials_match_the_s3_client(lcmq_env, services):
    minio = _env(services["minio"])
    assert minio["MINIO_ROOT_USER"] == lcmq_env["AWS_ACCESS_KEY_ID"]
    assert minio["MINIO_ROOT_PASSWORD"] == lcmq_env["AWS_SECRET_ACCESS_KEY"]
    # MinIO refuses to start with a shorter root user / password.
    assert len(minio["MINIO_ROOT_USER"]) >= 3 and len(minio["MINIO_ROOT_PASSWORD"]) >= 8
    mc_host = urlparse(_env(services["minio-init"])["MC_HOST_local"])
    assert (unquote(mc_host.username), unquote(mc_host.password)) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    assert lcmq_env["AWS_DEFAULT_REGION"] == lcmq_env["LCMQ_S3_REGION"]


def test_s3_endpoint_is_the_minio_api_port(lcmq_env, services):
    argv = _argv(services["minio"])
    assert argv[:2] == ["server", "/data"]
    assert _flag(argv, "--console-address") == ":9001"
    api_port = int((_flag(argv, "--address") or ":9000").rsplit(":", 1)[1])
    for url in (lcmq_env["LCMQ_S3_ENDPOINT_URL"], _env(services["minio-init"])["MC_HOST_local"]):
        parsed = urlparse(url)
        assert (parsed.hostname, parsed.port) == ("minio", api_port), url
    assert services["minio"]["healthcheck"]["test"]


# --- compose: commands ------------------------------------------------------------------


def _parse_lcmq(argv: list[str]):
    assert argv[0] == "lcmq"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"`{shlex.join(argv)}` does not parse (exit {exc.code})")


def test_lcmq_commands_parse_and_name_known_profiles(services):
    parsed = {}
    for name, svc in services.items():
        argv = _argv(svc)
        if argv and argv[0] == "lcmq":
            parsed[name] = _parse_lcmq(argv)
            model = getattr(parsed[name], "model", None)
            if model is not None:
                assert model in BUILTIN_PROFILES, f"{name}: unknown profile {model!r}"
    assert set(parsed) == set(LCMQ_SERVICES)
    assert (parsed["migrate"].command, parsed["migrate"].action) == ("db", "upgrade")
    gpu, cpu = parsed["worker-gpu"], parsed["worker-cpu"]
    assert (gpu.command, gpu.model, gpu.device, gpu.pool) == ("worker", "sd15", "cuda", "prefork")
    assert (cpu.command, cpu.model, cpu.device) == ("worker", "tiny", "cpu")
    assert parsed["scheduler"].command == "scheduler"
    assert (parsed["api"].command, parsed["api"].host, parsed["api"].port) == ("api", "0.0.0.0", 8000)


def test_api_publishes_its_port_and_is_healthy_when_ready(services):
    api = services["api"]
    port = _parse_lcmq(_argv(api)).port
    assert any(str(p).endswith(f":{port}:{port}") for p in api["ports"])
    # The healthcheck asks /readyz (database, broker, storage) on the port the API listens on;
    # urlopen raises on its 503, so the check fails until every part answers.
    check = " ".join(api["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/readyz" in check and "urlopen" in check
    deps = _depends_on(api)
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("postgres") == "service_healthy" and deps.get("redis") == "service_healthy"
    assert deps.get("minio-init") == "service_completed_successfully"
    assert api.get("restart") == "unless-stopped"


def test_scheduler_starts_after_the_schema_and_stays_up(services):
    deps = _depends_on(services["scheduler"])
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("postgres") == "service_healthy" and deps.get("redis") == "service_healthy"
    assert services["scheduler"].get("restart") == "unless-stopped"


def test_redis_keeps_queued_messages(services):
    argv = _argv(services["redis"])
    assert argv[0] == "redis-server"
    assert _flag(argv, "--appendonly") == "yes"
    assert _flag(argv, "--appendfsync") in ("everysec", "always")
    assert _flag(argv, "--maxmemory-policy") == "noeviction"
    assert any(str(v).endswith(":/data") for v in services["redis"]["volumes"])
    assert services["redis"]["healthcheck"]["test"]


def test_gpu_worker_reserves_an_nvidia_device(services):
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") in (1, "all")
        for d in devices
    ), devices
    assert "deploy" not in services["worker-cpu"]


# --- compose: start-up order ------------------------------------------------------------


def test_migrate_runs_before_workers(services):
    assert _depends_on(services["migrate"]).get("postgres") == "service_healthy"
    for name in WORKERS:
        deps = _depends_on(services[name])
        assert deps.get("migrate") == "service_completed_successfully", name
        assert deps.get("redis") == "service_healthy", name
        assert deps.get("minio-init") == "service_completed_successfully", name
    assert _depends_on(services["minio-init"]).get("minio") == "service_healthy"


def test_depends_on_conditions_are_satisfiable(services):
    for name, svc in services.items():
        for target, condition in _depends_on(svc).items():
            assert target in services, f"{name} depends on unknown {target}"
            if condition == "service_healthy":
                assert services[target].get("healthcheck", {}).get("test"), f"{target} has no healthcheck"
            elif condition == "service_completed_successfully":
                # A one-shot with a restart policy would be restarted instead of completing.
                assert services[target].get("restart", "no") == "no", f"{target} restarts"
    for name in ONE_SHOTS:
        assert services[name].get("restart", "no") == "no", name


def test_model_caches_live_on_a_declared_volume(compose, services, lcmq_env):
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source!r} is not declared"
    for name in WORKERS:
        targets = [str(v).split(":")[1] for v in services[name]["volumes"]]
        for key in ("HF_HOME", "LCMQ_MODELS_DIR"):
            path = Path(lcmq_env[key])
            assert any(path.is_relative_to(t) for t in targets), f"{name}: {key}={path} is on no volume"


# --- Dockerfile -------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") and not current:
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
        current = ""
    return logical


_PIP_VALUE_OPTIONS = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-f",
    "--find-links",
}


def _pip_installs() -> list[dict]:
    """Every `pip install` in a RUN, in order, with its positional arguments and options."""
    installs = []
    for number, (keyword, args) in enumerate(_instructions()):
        if keyword != "RUN":
            continue
        segment: list[str] = []
        for token in shlex.split(args) + ["&&"]:
            if token not in ("&&", ";", "||"):
                segment.append(token)
                continue
            if "pip" in segment[:3] and "install" in segment:
                rest = segment[segment.index("install") + 1 :]
                positional, options, i = [], {}, 0
                while i < len(rest):
                    if rest[i] in _PIP_VALUE_OPTIONS:
                        options[rest[i]] = rest[i + 1]
                        i += 2
                    else:
                        (options.setdefault(rest[i], "") if rest[i].startswith("-") else positional.append(rest[i]))
                        i += 1
                installs.append({"order": (number, len(installs)), "positional": positional, "options": options})
            segment = []
    return installs


def _makefile_torch_pin() -> str:
    match = re.search(r"^TORCH\s*\??=\s*(torch==\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile pins no TORCH"
    return match.group(1)


def test_dockerfile_base_workdir_and_cmd():
    instructions = _instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("WORKDIR", "/app") in instructions
    assert not [i for i in instructions if i[0] == "ENTRYPOINT"]
    cmd = [args for keyword, args in instructions if keyword == "CMD"][-1]
    assert json.loads(cmd) == ["lcmq", "--help"]
    with pytest.raises(SystemExit) as exc:  # argparse prints the help and exits 0
        build_parser().parse_args(json.loads(cmd)[1:])
    assert exc.value.code == 0


def test_dockerfile_installs_pinned_torch_before_the_project():
    installs = _pip_installs()
    torch = [p for p in installs if any(a.startswith("torch") for a in p["positional"])]
    project = [p for p in installs if "." in p["positional"]]
    assert len(torch) == 1 and len(project) == 1, installs
    torch, project = torch[0], project[0]
    assert torch["order"] < project["order"], "torch must be installed before `pip install .`"
    assert torch["positional"] == [_makefile_torch_pin()]  # the pin the Makefile and CI use
    # From the PyTorch index chosen by the build argument, whose default is documented.
    assert torch["options"].get("--index-url") in ("${TORCH_INDEX_URL}", "$TORCH_INDEX_URL")
    args = dict(a.split("=", 1) for k, a in _instructions() if k == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text and re.search(r"download\.pytorch\.org/whl/cu\d+", text)


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".lcmq", "renders", ".git"} <= patterns
    assert patterns & {"__pycache__", "**/__pycache__"}
