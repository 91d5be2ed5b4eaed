"""The contract's shape: import boundaries, queue settings, settings sources, profiles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcmq.errors import ConfigError, ProfileError
from lcmq.profiles import BUILTIN_PROFILES, get_profile, load_profiles, preflight, queue_name
from lcmq.queue import make_app
from lcmq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _imported_packages(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_worker_and_scheduler_never_import_each_other():
    assert "scheduler" not in _imported_packages("worker")
    assert "worker" not in _imported_packages("scheduler")
    assert "torch" not in _imported_packages("scheduler")


def test_contract_imports_without_torch_or_the_sides():
    code = (
        "import sys, lcmq, lcmq.api, lcmq.queue, lcmq.storage, lcmq.repository, lcmq.spec, lcmq.migrate,"
        " lcmq.formats, lcmq.manifest, lcmq.export;"
        "print(json.dumps(sorted(m for m in ('torch','diffusers','worker','scheduler') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_celery_app_is_json_only_with_late_acks():
    app = make_app(Settings(broker_url="redis://127.0.0.1:6379/0", render_timeout_s=600))
    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_time_limit == 600 and conf.task_soft_time_limit < 600
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert queue_name("tiny") == "render.tiny" == get_profile("tiny").queue


def test_settings_env_beats_toml_beats_defaults(tmp_path, monkeypatch):
    config = tmp_path / "lcmq.toml"
    config.write_text('chunk_size = 32\nbatch_size = 2\nstorage_url = "s3://b/p"\n[profiles.tiny]\nsteps = 6\n')
    monkeypatch.setenv("LCMQ_CONFIG", str(config))
    monkeypatch.setenv("LCMQ_BATCH_SIZE", "8")
    settings = Settings()
    assert settings.chunk_size == 32 and settings.batch_size == 8 and settings.storage_url == "s3://b/p"
    assert settings.lease_s == Settings.model_fields["lease_s"].default
    assert load_profiles()["tiny"].steps == 6


def test_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("LCMQ_DATABASE_URL", "LCMQ_BROKER_URL", "LCMQ_STORAGE_URL", "LCMQ_HOME", "LCMQ_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings()
    assert settings.database_url_resolved == f"sqlite:///{tmp_path / '.lcmq' / 'lcmq.db'}"
    assert settings.embedded_broker and settings.storage_url == "file://renders"


def test_bad_settings_name_the_variable(monkeypatch):
    from lcmq.settings import get_settings, reset_settings

    monkeypatch.setenv("LCMQ_STORAGE_URL", "ftp://nope")
    reset_settings()
    with pytest.raises(ConfigError, match="LCMQ_STORAGE_URL"):
        get_settings()
    monkeypatch.undo()
    reset_settings()


def test_user_profile_inherits_family_defaults(tmp_path):
    config = tmp_path / "lcmq.toml"
    config.write_text('[profiles.shop]\nfamily = "sdxl"\nbase = "/models/shop"\n')
    shop = load_profiles(config)["shop"]
    assert (shop.width, shop.lcm_lora, shop.queue) == (1024, "latent-consistency/lcm-lora-sdxl", "render.shop")


@pytest.mark.parametrize(
    "table, message",
    [
        ('family = "sd3"\nbase = "x"', "family: must be one of"),
        ('family = "sd15"', "base: required"),
        ('family = "sd15"\nbase = "x"\nsteps = "four"', "steps: must be an integer"),
        ('family = "sd15"\nbase = "x"\ndtype = "int8"', "dtype: must be one of"),
        ('family = "sd15"\nbase = "x"\ncolour = 1', "unknown key(s) colour"),
    ],
)
def test_bad_profiles_are_named(tmp_path, table, message):
    config = tmp_path / "lcmq.toml"
    config.write_text(f"[profiles.bad]\n{table}\n")
    with pytest.raises(ProfileError, match=r"\[profiles\.bad\].*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_profiles(config)


def test_preflight_accepts_hub_ids_and_generated_models():
    preflight(BUILTIN_PROFILES["sd15"])
    preflight(BUILTIN_PROFILES["tiny"])


def test_tls_and_authenticated_urls_are_accepted():
    import ssl

    settings = Settings(
        broker_url="rediss://:s3cret@redis.example:6380/0",
        database_url="postgresql://lcmq:s3cret@db.example:5432/lcmq?sslmode=verify-full",
        storage_url="s3://bucket/prefix",
        s3_endpoint_url="https://minio.example:9000",
    )
    app = make_app(settings)
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    from lcmq.repository import Repository

    repo = Repository(settings.database_url_resolved)  # builds the engine; connects lazily
    assert "s3cret" not in repo.safe_url and "sslmode=verify-full" in repo.safe_url
    assert repo.engine.dialect.name == "postgresql"
