"""deploy/k8s/ checked against Kubernetes' schemas and against the code it drives.

There is no cluster here: the core objects are validated offline with kubernetes-validate's
bundled OpenAPI schemas (strict: an unknown field fails), KEDA's ScaledObjects (a CRD it has no
schema for) field by field, and every command, setting and metric name the manifests use is fed to
lcmq itself: `lcmq …` argv to the CLI's parser, LCMQ_* keys to Settings, PromQL metric names and
labels to a real scrape of the API's /metrics (an app on the embedded SQLite database).
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lcmq.cli import build_parser
from lcmq.models import JobState
from lcmq.profiles import BUILTIN_PROFILES
from lcmq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.29.0"  # the oldest minor still in the main clouds' support windows
NOT_APPLIED = {"kustomization.yaml", "secret.example.yaml"}
KEDA_TRIGGER_KEYS = {"serverAddress", "query", "threshold", "activationThreshold", "ignoreNullValues"}
PROMQL_METRIC = re.compile(r"\b(lcmq_[a-z_]+)\b")
PROMQL_MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    """Every object of the manifests, the example Secret included."""
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in documents(path)]


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    return {
        obj["metadata"]["name"]: obj["spec"]["template"]["spec"]
        for obj in objects
        if obj["kind"] in ("Deployment", "Job")
    }


def containers(objects: list[dict]) -> list[tuple[str, dict]]:
    return [(name, c) for name, spec in pod_specs(objects).items() for c in spec["containers"]]


def parse_lcmq(argv: list[str]):
    assert argv[0] == "lcmq", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"`{' '.join(argv)}` does not parse (exit {exc.code})")


def workers(objects: list[dict]) -> dict[str, object]:
    """The worker Deployments by name, each with its parsed `lcmq worker` command."""
    found = {}
    for name, container in containers(objects):
        args = parse_lcmq(container["command"])
        if args.command == "worker":
            found[name] = args
    return found


@pytest.fixture(scope="module")
def live_app(tmp_path_factory, objects) -> dict:
    """A real app on an embedded database: what its /metrics serves ({family: samples}) and the
    status each HTTP path the manifests name answers with."""
    import os

    from fastapi.testclient import TestClient

    from lcmq.http.app import create_app

    paths = set()
    for container in (c for _, c in containers(objects)):
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                paths.add(container[probe]["httpGet"]["path"])
    paths |= {
        obj["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/path", "/metrics")
        for obj in of_kind(objects, "Deployment").values()
    }
    home = tmp_path_factory.mktemp("k8s-app")
    kept = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LCMQ_")}
    try:
        settings = Settings(home=home / ".lcmq", models_dir=home / "models", storage_url=f"file://{home / 'renders'}")
        with TestClient(create_app(settings, run_background=False)) as client:
            text = client.get("/metrics").text
            statuses = {path: client.get(path).status_code for path in sorted(paths)}
    finally:
        os.environ.update(kept)
    return {"metrics": {f.name: f.samples for f in text_string_to_metric_families(text)}, "statuses": statuses}


@pytest.fixture(scope="module")
def scrape(live_app) -> dict[str, list]:
    return live_app["metrics"]


# --- Kubernetes' own schemas ------------------------------------------------------------


def test_the_kustomization_applies_every_manifest_but_the_example_secret():
    kustomization = documents(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - NOT_APPLIED
    images = {image["name"] for image in kustomization["images"]}
    assert images == {"lcmq"}


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_core_objects_are_valid_kubernetes(path):
    for doc in documents(K8S / path):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked below
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_validator_would_refuse_a_misspelt_field():
    """The check above can fail: a field Kubernetes does not know is an error in strict mode."""
    deployment = documents(K8S / "scheduler.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- what the pods run ------------------------------------------------------------------


def test_every_command_parses_and_names_a_known_profile(objects):
    commands = {name: parse_lcmq(c["command"]) for name, c in containers(objects)}
    assert {args.command for args in commands.values()} == {"db", "api", "scheduler", "worker"}
    for name, args in commands.items():
        if args.command == "worker":
            assert args.model in BUILTIN_PROFILES, f"{name}: unknown profile {args.model!r}"
            assert args.metrics_port is not None, name
    api = next(args for args in commands.values() if args.command == "api")
    assert (api.host, api.port, api.no_signin_link) == ("0.0.0.0", 8000, True)


def test_env_keys_are_settings_and_their_values_pass_validation(objects, monkeypatch, tmp_path):
    config = of_kind(objects, "ConfigMap")["lcmq-config"]["data"]
    secret = of_kind(objects, "Secret")["lcmq-secrets"]["stringData"]
    explicit = {e["name"]: e["value"] for _, c in containers(objects) for e in c.get("env", [])}
    keys = {**config, **secret, **explicit}
    for key in keys:
        if key.startswith("LCMQ_"):
            assert key[len("LCMQ_") :].lower() in Settings.model_fields, f"{key} is no lcmq setting"
        else:
            assert key in ("HF_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), key
    for key in [k for k in list(__import__("os").environ) if k.startswith("LCMQ_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LCMQ_CONFIG", str(tmp_path / "absent.toml"))
    values = {k[len("LCMQ_") :].lower(): v for k, v in keys.items() if k.startswith("LCMQ_")}
    settings = Settings(**values)
    assert settings.storage_url.startswith("s3://") and not settings.embedded_broker
    assert settings.database_url.startswith("postgresql://")


def test_every_pod_reads_the_config_map_and_the_secret(objects):
    for name, container in containers(objects):
        sources = container["envFrom"]
        assert {"configMapRef": {"name": "lcmq-config"}} in sources, name
        assert {"secretRef": {"name": "lcmq-secrets"}} in sources, name
        assert container["image"] == "lcmq", name  # the name the kustomization's `images` rewrites


def test_gpu_workers_hold_one_gpu_and_every_worker_the_model_cache(objects):
    config = of_kind(objects, "ConfigMap")["lcmq-config"]["data"]
    claims = set(of_kind(objects, "PersistentVolumeClaim"))
    specs = pod_specs(objects)
    gpu = {name for name, args in workers(objects).items() if args.device == "cuda"}
    assert gpu, "no GPU worker"
    for name in workers(objects):
        spec = specs[name]
        container = spec["containers"][0]
        limits = container["resources"].get("limits", {})
        if name in gpu:
            assert limits.get("nvidia.com/gpu") == 1, name
            assert workers(objects)[name].pool == "solo", name  # one process per GPU (docs/farm.md)
        else:
            assert "nvidia.com/gpu" not in limits, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = [m for m in container["volumeMounts"] if volumes[m["name"]].get("persistentVolumeClaim")]
        assert all(volumes[m["name"]]["persistentVolumeClaim"]["claimName"] in claims for m in mounts), name
        for key in ("LCMQ_MODELS_DIR", "HF_HOME"):
            assert any(Path(config[key]).is_relative_to(m["mountPath"]) for m in mounts), f"{name}: {key} on no volume"
        # A scale-down's SIGTERM lets the micro-batch in hand finish (compose: stop_grace_period 2m).
        assert spec["terminationGracePeriodSeconds"] >= 60, name


def test_the_api_service_probes_and_scrape_port_match_the_app(objects, live_app):
    assert live_app["statuses"] == dict.fromkeys(live_app["statuses"], 200), "a probe or scrape path is not served"
    paths = set(live_app["statuses"])
    deployment = of_kind(objects, "Deployment")["lcmq-api"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    port = parse_lcmq(container["command"]).port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"http": port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in paths and container[probe]["httpGet"]["port"] == "http"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in paths
    service = of_kind(objects, "Service")["lcmq-api"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    for name, args in workers(objects).items():
        annotations = of_kind(objects, "Deployment")[name]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(args.metrics_port), name


# --- KEDA -------------------------------------------------------------------------------


def test_one_scaled_object_per_worker_profile_scales_to_zero(objects):
    scaled = of_kind(objects, "ScaledObject")
    deployments = of_kind(objects, "Deployment")
    targets = {obj["spec"]["scaleTargetRef"]["name"] for obj in scaled.values()}
    assert targets == set(workers(objects)), "every worker Deployment, and only those, is scaled"
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        assert "replicas" not in deployments[spec["scaleTargetRef"]["name"]]["spec"], "KEDA owns the replicas"
        assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] > 0, name
        assert int(spec["pollingInterval"]) > 0 and int(spec["cooldownPeriod"]) > 0, name
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus", name
            metadata = trigger["metadata"]
            assert set(metadata) <= KEDA_TRIGGER_KEYS and {"serverAddress", "query", "threshold"} <= set(metadata)
            assert metadata["serverAddress"].startswith(("http://", "https://"))
            for key in ("threshold", "activationThreshold"):  # KEDA reads them as strings
                assert isinstance(metadata.get(key, "0"), str) and float(metadata.get(key, "0")) >= 0


def test_triggers_query_metrics_the_api_serves_for_their_profile(objects, scrape):
    assert {"lcmq_queue_oldest_seconds", "lcmq_queue_depth", "lcmq_jobs"} <= set(scrape)
    profiles = {name: args.model for name, args in workers(objects).items()}
    used = set()
    for obj in of_kind(objects, "ScaledObject").values():
        profile = profiles[obj["spec"]["scaleTargetRef"]["name"]]
        for trigger in obj["spec"]["triggers"]:
            query = trigger["metadata"]["query"]
            metrics = PROMQL_METRIC.findall(query)
            assert len(metrics) == 1, query
            metric = metrics[0]
            assert metric in scrape, f"{query}: /metrics serves no {metric}"
            used.add(metric)
            matchers = dict(PROMQL_MATCHER.findall(query))
            assert matchers.get("profile") == profile, f"{query} is not about {profile}"
            series = [sample.labels for sample in scrape[metric]]
            assert any(matchers.items() <= labels.items() for labels in series), f"{query} matches no series"
            if "state" in matchers:
                assert matchers["state"] in {state.value for state in JobState}
    # Age to scale on, depth to wake from zero (docs/metrics.md#scaling-on-the-queues-age).
    assert {"lcmq_queue_oldest_seconds", "lcmq_queue_depth"} <= used
