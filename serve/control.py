"""The control plane: deploy the app for a run, and swap a running app to another model in place.

The swappable URIs ride only in the deployments' user_config and the args hold the rest, so the
app's code version (a hash of import path, runtime env and args) is the same for every
checkpoint: deploying again with another model is an in-place reconfigure of the running
replicas, which keep serving the old model until the new one has loaded (serve/app.py
`Ingress.reconfigure`). Models are told apart by identity (recsys.encoder.model_id_at), never by
path. Object-store credentials never enter the args or the Serve config: replicas read them from
their environment (a local cluster inherits this process's; on Kubernetes a Secret fills it)."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from ray import serve

from serve.app import SWAPPABLE, user_configs
from serve.catalog import storage_cfg
from serve.schemas import AppArgs

log = logging.getLogger(__name__)

# Environment variables never copied into a Serve config's runtime_env.
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def app_args(cfg: Any) -> dict[str, Any]:
    """AppArgs for a run's artefacts from a recsys Config (its `serve` section fills the rest)."""
    from recsys import paths, storage
    from recsys.encoder import model_id_at
    from recsys.index import INDEX_META, check_model, index_model_id

    s = cfg.serve
    model_uri = s.model_uri or paths.export_dir(cfg)
    model_id = model_id_at(model_uri, cfg.storage)
    index = s.index_uri
    if index:
        check_model(index_model_id(index, cfg.storage), model_id, index)
    elif storage.exists(storage.join(paths.index_dir(cfg), INDEX_META), cfg.storage):
        # The run's index is used only if this model built it: a stale one (an earlier training
        # at the same path, or another model) is an error, not a silently wrong catalog.
        index = paths.index_dir(cfg)
        check_model(index_model_id(index, cfg.storage), model_id, index)
    else:
        log.info("no index at %s: the replicas embed the catalog with model %s at start-up", paths.index_dir(cfg), model_id)
    shared = {k: getattr(s, k) for k in AppArgs.model_fields if hasattr(s, k)}
    args = {**shared, "model_uri": model_uri, "items_uri": s.items_uri or paths.items(cfg), "index_uri": index,
            "s3_endpoint": cfg.storage.s3_endpoint, "s3_max_attempts": cfg.storage.s3_max_attempts,
            "profile_log_dir": _profile_log_dir(cfg)}
    AppArgs(**args)  # fail here, in the job, on a bad value rather than in a replica
    return args


def _profile_log_dir(cfg: Any) -> str:
    """serve.profile_log_dir, else <root>/profiles for a local root (absolute: the store actor's
    working directory is not this process's); an object-store root cannot hold an appended log."""
    from recsys import storage

    if cfg.serve.profile_log_dir:
        return os.path.abspath(cfg.serve.profile_log_dir)
    if storage.is_remote(cfg.storage.root):
        log.warning("live profiles are kept in memory only (lost if their store actor dies): storage.root %s is an object "
                    "store; set serve.profile_log_dir to a local or mounted directory to persist them", cfg.storage.root)
        return ""
    return os.path.abspath(os.path.join(cfg.storage.root.removeprefix("file://"), "profiles"))


def app_config(args: dict[str, Any], name: str = "recsys", route_prefix: str = "/", model_id: str = "") -> dict[str, Any]:
    """The app as a declarative Serve application config (the schema `serve deploy` takes).
    `model_id` (the identity of the model at model_uri; `deploy_args` fills it) goes into the
    user_configs: without it, a model retrained to the same path is not seen as a change."""
    a = AppArgs(**args)
    if not a.model_uri or not a.items_uri:
        raise ValueError("app_config needs model_uri and items_uri")
    if a.auth_token:
        # The Serve config is readable by anyone with dashboard access: the token must come from
        # the replicas' environment (a Kubernetes Secret), named by auth_token_env.
        raise ValueError("serve.auth_token would be written into the Serve config in clear: put the token in an environment "
                         "variable of the cluster (a Secret) and set serve.auth_token_env to its name instead")
    static = {**a.model_dump(), **{k: "" for k in SWAPPABLE}}
    out: dict[str, Any] = {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": "serve.app:app_builder",
        "args": static,
        "deployments": [{"name": n, "user_config": uc} for n, uc in user_configs(a, model_id).items()],
    }
    import ray

    # A submitted job's working dir / env must reach the replicas the controller builds; its
    # secrets must not (the Serve config is readable by anyone with dashboard access).
    current = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    env = {k: v for k, v in current.items() if k in ("working_dir", "py_modules", "env_vars", "pip")}
    if "env_vars" in env:
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if not _SECRET_ENV.search(k)}
    if env:
        out["runtime_env"] = env
    return out


def check_app_config(app: dict[str, Any]) -> dict[str, str]:
    """Validate a declarative app config (serve/config.yaml, the RayService, `app_config`'s
    output) and return the model and catalog it serves. The URIs may sit in args (a change is a
    full redeploy) or in the Ingress's user_config (a change is an in-place swap); a separate
    Retriever's user_config must then name the same model, or no query would match the catalog."""
    a = AppArgs(**app.get("args", {}))
    ucs = {d["name"]: d.get("user_config") for d in app.get("deployments", []) if d.get("user_config") is not None}
    unknown = set(ucs) - {"Ingress", "Retriever", "Profiles"}
    if unknown:
        raise ValueError(f"deployments {sorted(unknown)} are not in the app (Ingress, Retriever, Profiles)")
    ing, ret = ucs.get("Ingress"), ucs.get("Retriever")
    if ret is not None and a.retriever != "deployment":
        raise ValueError("a Retriever user_config, but args.retriever is not 'deployment': the catalog is in the Ingress replicas")
    if ing is None or not ing.get("model_uri"):
        if ret is not None:
            raise ValueError("the URIs are in the Retriever's user_config: put them in the Ingress's too")
        out = {"model_uri": a.model_uri, "items_uri": a.items_uri, "index_uri": a.index_uri}
    else:
        if a.model_uri or a.items_uri or a.index_uri:
            raise ValueError("URIs in user_config: leave them out of args (a change there restarts every replica)")
        for key in ("max_batch_size", "batch_wait_timeout_s", "batching"):
            if key not in ing:
                raise ValueError(f"the Ingress's user_config replaces the one built from args: it needs {key!r}")
        if ret is not None:
            for key in (*SWAPPABLE, "model_id"):
                if (ing.get(key) or "") != (ret.get(key) or ""):
                    raise ValueError(f"Ingress user_config {key} {ing.get(key)!r} != Retriever's {ret.get(key)!r}")
        elif a.retriever == "deployment":
            raise ValueError("args.retriever is 'deployment': give the Retriever's user_config the same URIs")
        out = {k: ing.get(k) or "" for k in SWAPPABLE}
    if not out["model_uri"] or not out["items_uri"]:
        raise ValueError(f"app {app.get('name')!r} names no model_uri or items_uri")
    return out


def _apply(app: dict[str, Any]) -> None:
    """Apply one app's declarative config, keeping the other declaratively deployed apps (a
    declarative apply replaces the whole set)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    current = client.get_serve_details().get("applications", {})
    others = [d["deployed_app_config"] for n, d in current.items() if n != app["name"] and d.get("deployed_app_config")]
    client.deploy_apps(ServeDeploySchema(applications=[*others, app]))


class ModelLoadFailed(RuntimeError):
    """A replica could not load the model a deploy or swap asked for (its error attached)."""


def _replica_infos(name: str, deployment: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    """`info` of the deployment's replicas, by replica id. Handles route each call to one replica
    of their choice, so several calls go out at once; a replica none reached is absent."""
    handle = serve.get_deployment_handle(deployment, name)
    calls = [handle.info.remote() for _ in range(max(2, 4 * len(ids)))]
    out: dict[str, dict[str, Any]] = {}
    for c in calls:
        info = c.result(timeout_s=10)
        out[info.get("replica_id", "")] = info
    return out


def _wait_serving(name: str, model_id: str, model_uri: str, items_uri: str, timeout_s: float) -> None:
    """Until the app is RUNNING and every replica of its Ingress (and of a separate Retriever)
    serves model `model_id` (the identity: the same URI may have held another model a moment
    ago) from `model_uri`, over the catalog at `items_uri`. Raises ModelLoadFailed as soon as a
    replica reports that it could not load exactly that model (it keeps serving the one it
    has): a replica that fails no longer keeps the app out of RUNNING."""
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            st = serve.status().applications.get(name)
            if st is None or not str(st.status).endswith("RUNNING"):
                last = f"{st.status}: {getattr(st, 'message', '')[:300]}" if st is not None else "absent"
                time.sleep(0.5)
                continue
            deployments = _get_global_client().get_serve_details()["applications"][name]["deployments"]
            pending: list[str] = []
            for dep in ("Ingress", "Retriever"):
                if dep not in deployments:
                    continue
                ids = {r["replica_id"] for r in deployments[dep]["replicas"] if str(r["state"]).endswith("RUNNING")}
                infos = _replica_infos(name, dep, ids)
                for rid, info in infos.items():
                    e = info.get("load_error")
                    if e and (e.get("model_uri"), e.get("model_id")) == (model_uri, model_id):
                        raise ModelLoadFailed(f"app {name!r}: {dep} replica {rid} could not load model {model_id} from {model_uri} "
                                              f"and serves model {info['model_id']} from {info['model_uri']} still: {e['error']}")
                for rid in sorted(ids):
                    info = infos.get(rid)
                    with_items = dep == "Retriever" or info is not None and info.get("retriever") == "in_replica"
                    if info is None or (info["model_id"], info["model_uri"]) != (model_id, model_uri) or (
                            with_items and info.get("items_uri") != items_uri):
                        pending.append(f"{dep} {rid}: " + ("not reached" if info is None else f"{info['model_id']} from {info['model_uri']}"))
            if not pending:
                return
            last = "; ".join(pending)[:500]
        except ModelLoadFailed:
            raise
        except Exception as e:  # noqa: BLE001 - replicas starting up: keep waiting until the deadline
            last = repr(e)[:200]
        time.sleep(0.5)
    raise TimeoutError(f"app {name!r} did not come to serve model {model_id} ({model_uri}) within {timeout_s:.0f}s (last seen: {last})")


def _deployed(name: str) -> dict[str, Any] | None:
    from ray.serve.context import _get_global_client

    current = _get_global_client().get_serve_details().get("applications", {}).get(name) or {}
    return current.get("deployed_app_config") or None


def _roll_back(name: str, previous: dict[str, Any], error: ModelLoadFailed, model_uri: str) -> ModelLoadFailed:
    """Declare the app back to `previous` after `error` (a replica could not load `model_uri`),
    so replicas Serve starts later load the model that is served, not the one that failed; wait
    until every replica serves it again. Not when the old model is gone from its URI (re-exported
    there since): the new declaration stays, and the replicas keep retrying it."""
    ing = next((d.get("user_config") or {} for d in previous.get("deployments", []) if d.get("name") == "Ingress"), {})
    old = {k: ing.get(k) or previous.get("args", {}).get(k, "") for k in ("model_id", "model_uri", "items_uri", "index_uri")}
    try:
        now = _check_deployable({**previous["args"], **old})
    except Exception:  # noqa: BLE001 - the store may be what failed: the replicas still hold the old model
        now = old["model_id"]
    if old["model_id"] and now != old["model_id"]:
        return ModelLoadFailed(f"{error}. Not rolled back: the model the app served before ({old['model_id']}) is no longer at "
                               f"{old['model_uri']} (now {now}); the app stays declared to {model_uri} and its replicas retry it")
    _apply(previous)
    try:
        _wait_serving(name, old["model_id"] or now, old["model_uri"], old["items_uri"], timeout_s=60)
        where = "and every replica serves it"
    except (ModelLoadFailed, TimeoutError) as e:
        where = f"and a replica that had loaded the new model goes back to it, retrying until it can ({e})"
    return ModelLoadFailed(f"{error}. The swap is rolled back: the app is declared to serve model {old['model_id']} from "
                           f"{old['model_uri']} again, {where}; swap again once {model_uri} can be read")


def _check_deployable(args: dict[str, Any]) -> str:
    """The identity of the model at args' model_uri, after refusing an index another model built
    (before anything is deployed: in a replica the same refusal would only show as a timeout)."""
    from recsys.encoder import model_id_at
    from recsys.index import check_model, index_model_id

    cfg = storage_cfg(AppArgs(**args))
    model_id = model_id_at(args["model_uri"], cfg)
    if args.get("index_uri"):
        check_model(index_model_id(args["index_uri"], cfg), model_id, args["index_uri"])
    return model_id


def deploy_args(args: dict[str, Any], name: str = "recsys", route_prefix: str = "/", timeout_s: float = 600.0) -> None:
    """Deploy (or swap in place: same args but the URIs or the model at them) the app
    declaratively; returns once it serves the model now at `args`' model_uri, by identity.
    Serve must be started (`serve.start`)."""
    model_id = _check_deployable(args)
    previous = _deployed(name)
    _apply(app_config(args, name, route_prefix, model_id=model_id))
    try:
        _wait_serving(name, model_id, args["model_uri"], args["items_uri"], timeout_s)
    except ModelLoadFailed as e:
        if previous is None:
            raise
        raise _roll_back(name, previous, e, args["model_uri"]) from e


def swap(name: str, model_uri: str, index_uri: str = "", items_uri: str = "", timeout_s: float = 600.0) -> None:
    """Point a running, declaratively deployed app at another model (and index / catalog):
    an in-place reconfigure, with no replica restart; requests keep being answered, each wholly
    by the old or wholly by the new model. Returns once the new model serves."""
    app = _deployed(name)
    if not app:
        raise ValueError(f"app {name!r} is not deployed declaratively (serve.control.deploy / serve deploy); a serve.run app is replaced, not swapped")
    deployments = {d["name"]: dict(d) for d in app.get("deployments", [])}
    ing = dict(deployments.get("Ingress", {}).get("user_config") or {})
    new = {"model_uri": model_uri, "items_uri": items_uri or ing.get("items_uri") or app["args"].get("items_uri", ""), "index_uri": index_uri}
    # The deployed app's args carry its object-store settings; the identity (and the index
    # check) is taken from the model at model_uri now, so a re-export to the same path swaps.
    new["model_id"] = _check_deployable({**app["args"], **new})
    deployments["Ingress"] = {**deployments.get("Ingress", {"name": "Ingress"}), "user_config": {**ing, **new}}
    if "Retriever" in deployments:
        deployments["Retriever"] = {**deployments["Retriever"], "user_config": dict(new)}
    _apply({**app, "deployments": list(deployments.values())})
    try:
        _wait_serving(name, new["model_id"], model_uri, new["items_uri"], timeout_s)
    except ModelLoadFailed as e:
        raise _roll_back(name, app, e, model_uri) from e


def deploy(cfg: Any) -> dict[str, Any]:
    """Deploy the app for this run's model and index declaratively; returns once it serves.
    Deploying again after training a new checkpoint swaps the model in place."""
    from recsys.runtime import ensure_ray

    # Keys given in the config reach a local cluster's replicas through the environment it
    # inherits from this process when ensure_ray starts it, never through the Serve config.
    ensure_ray(cfg=cfg)
    s = cfg.serve
    args = app_args(cfg)
    t = time.perf_counter()
    serve.start(http_options={"host": s.host, "port": s.port})
    deploy_args(args, name=s.app_name, route_prefix=s.route_prefix)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    log.info("app %r ready at %s in %.1fs", s.app_name, url, time.perf_counter() - t)
    shown = {k: ("***" if k == "auth_token" and v else v) for k, v in args.items()}
    return {"app": s.app_name, "url": url, "ready_s": round(time.perf_counter() - t, 1), "args": shown}
