"""Training faults against the noise of two seeds (issue 18).

    python -m bench.fault_noise [--config jobs/configs/demo.yaml] [--steps 80] [--checkpoint-every 10]
        [--s3-dir runs/fault-noise-s3] [--out docs/results/reliability/fault_noise.json] [section.key=value ...]

Starts a real S3 server (rclone, recsys.storage.LocalS3Server, on loopback, stopped by its own
object at the end) and a private local Ray cluster, prepares one data set into the store
(recsys.data.prepare; default: the demo shop of jobs/configs/demo.yaml, its bundled MiniLM,
with the text user tower: the stage Ray Train + DeepSpeed trains), then trains four runs with
one step budget, every checkpoint uploaded through S3, and evaluates each export with the
project's evaluator (recsys.evaluate, test split, full catalog):

    A0  uninterrupted, train.seed=0
    A1  uninterrupted, train.seed=1                      (the noise between two seeds)
    F0  seed 0, three faults in one run (train.max_failures=3): a Ray Train worker SIGKILLed
        at 25% and at 50% of the budget (each once a checkpoint at least that new is
        registered), then killed in the middle of the checkpoint save at 75% (the S3 server
        frozen with SIGSTOP as soon as that checkpoint's folder holds a file, a worker
        SIGKILLed, 1 s held, SIGCONT)
    W0  seed 0, 2 workers stopped at half the budget (a worker killed with max_failures=0 once
        the half-way checkpoint is registered, so steps 1..half follow the full budget's
        learning-rate schedule, as in A0), re-submitted under the same run_name with
        train.num_workers=1, twice the batch per worker (the same global batch, as the resume's
        warning advises) and the full budget (DeepSpeed universal checkpoint resume).
        `--w0-first budget` instead gives the first submission max_steps = half;
        `--w0-global-batch per-worker` keeps the batch per worker (halving the global batch).

Each fault is checked from outside (kill PIDs, the partial checkpoint left unregistered, the
step each attempt resumed from, every step logged once, each step's batch digest against A0's).
For W0 the examples it read are replayed outside training (`regrid_data`: the run's dataset
split as Ray Train splits it and read by recsys.stream as the workers read it): how many the
resume walked past, and how many it trains on again in the same epoch. `--data-check-only` replays that alone on the data
an earlier run left in --s3-dir. The report compares F0, W0 and A1
with A0 per task on NDCG@10, recall@10 and MRR@10: the difference, and a paired test over the
test queries (recsys.significance.paired_comparison, queries matched by key). Seed noise =
|A1 - A0|; a run is "within noise" when its paired bootstrap p > 0.05 and |diff| <= seed noise.
Prints a table, writes JSON to --out; records wall time per run and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.faults import complete_rows, frozen, kill_train_worker, run_dir, when
from recsys.config import Config, load_config
from recsys.storage import LocalS3Server

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fault-noise"
METRICS = ("ndcg@10", "recall@10", "mrr@10")
SYSTEM = "fine_tuned"
POLL_S = 0.2


# ---------------------------------------------------------------- watching a run from outside


def rows_on_disk(server: LocalS3Server, cfg: Config) -> list[dict[str, Any]]:
    """Rank 0's metric rows (metrics.jsonl); a line caught mid-write is left out."""
    return complete_rows(run_dir(server, cfg) / "metrics.jsonl")


def snapshot(server: LocalS3Server, cfg: Config) -> dict[str, Any]:
    """Ray Train controller's checkpoint_manager_snapshot.json ({} while absent or mid-write)."""
    try:
        return json.loads((run_dir(server, cfg) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return {}


def registered_step(server: LocalS3Server, cfg: Config) -> int:
    """The step of the latest registered checkpoint (0 = none)."""
    latest = snapshot(server, cfg).get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def registered_dirs(server: LocalS3Server, cfg: Config) -> list[str]:
    return [c["checkpoint_dir_name"] for c in snapshot(server, cfg).get("checkpoint_results", [])]


def checkpoint_files(server: LocalS3Server, cfg: Config) -> dict[str, int]:
    """checkpoint folder name -> number of files in it (partial uploads included)."""
    d = run_dir(server, cfg)
    return {p.name: sum(1 for f in p.rglob("*") if f.is_file()) for p in sorted(d.glob("checkpoint_*")) if p.is_dir()}


def after_kill(rows: list[dict[str, Any]], kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the attempt after the last kill (a restarted group has start_step > 0 and goes past
    the step the kill was sent at); every row before the first kill."""
    if not kills:
        return rows
    return [r for r in rows if r.get("start_step", 0) > 0 and r["step"] > kills[-1]["step_seen"]]


def _ancestors(pid: int) -> set[int]:
    out: set[int] = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def own_raylet_pid() -> int:
    """The PID of this process's own Ray node's raylet (the parent of its workers)."""
    import ray._private.worker as ray_worker

    return int(ray_worker._global_node.all_processes["raylet"][0].process.pid)


def kill_own_train_worker(address: str) -> int:
    """bench.faults.kill_train_worker, after checking that every live Ray Train worker the
    cluster at `address` names is a child of this process's own raylet (never a process of a
    cluster someone else runs on the machine)."""
    from ray.util.state import list_actors

    raylet = own_raylet_pid()
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    foreign = [int(w.pid) for w in workers if raylet not in _ancestors(int(w.pid))]
    if foreign:
        raise RuntimeError(f"Ray Train workers {foreign} are not children of our raylet {raylet}: not killing")
    return kill_train_worker(address)


@dataclass
class Faults:
    """What the fault threads did and saw."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    save_kill: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def kill_at(server: LocalS3Server, cfg: Config, address: str, steps: list[int], faults: Faults,
            done: threading.Event) -> None:
    """For each of `steps`: once the attempt after the last kill has logged it and a checkpoint at
    least that new is registered, SIGKILL one Ray Train worker of this cluster."""
    try:
        for at in steps:
            while not done.is_set():
                fresh = after_kill(rows_on_disk(server, cfg), faults.kills)
                reg = registered_step(server, cfg)
                if fresh and fresh[-1]["step"] >= at and reg >= at:
                    pid = kill_own_train_worker(address)
                    if pid:
                        faults.kills.append({"at": at, "step_seen": fresh[-1]["step"], "pid": pid, "registered_step": reg,
                                             "t": time.time()})
                        print(f"  fault: SIGKILL worker pid {pid} at step {fresh[-1]['step']} (registered checkpoint: step {reg})",
                              flush=True)
                        break
                time.sleep(POLL_S)
    except BaseException as e:  # reported, not lost in the thread
        faults.error = repr(e)


class SaveStarted:
    """A `bench.faults.when` condition: after `kills_first` kills, once the next attempt has a
    checkpoint registered at `armed_at` or later, the first new checkpoint folder that holds a
    file (the save after `armed_at` has begun uploading)."""

    def __init__(self, server: LocalS3Server, cfg: Config, faults: Faults, kills_first: int, armed_at: int) -> None:
        self.server, self.cfg, self.faults, self.kills_first, self.armed_at = server, cfg, faults, kills_first, armed_at
        self.known: set[str] | None = None
        self.folder = ""
        self._last = 0.0

    def __call__(self) -> dict[str, int] | None:
        if self.known is None:
            if len(self.faults.kills) < self.kills_first or time.monotonic() - self._last < POLL_S:
                return None
            self._last = time.monotonic()
            fresh = after_kill(rows_on_disk(self.server, self.cfg), self.faults.kills)
            if fresh and registered_step(self.server, self.cfg) >= self.armed_at:
                self.known = set(checkpoint_files(self.server, self.cfg))
                step = fresh[-1]["step"]
                print(f"  fault armed at step {step}: next checkpoint save gets a kill mid-upload", flush=True)
            return None
        d = run_dir(self.server, self.cfg)
        for p in d.glob("checkpoint_*"):
            if p.name not in self.known and any(f.is_file() for f in p.rglob("*")):
                self.folder = p.name
                return {"step_logged": max((r["step"] for r in rows_on_disk(self.server, self.cfg)), default=0)}
        return None


def save_kill(server: LocalS3Server, cfg: Config, address: str, cond: SaveStarted, faults: Faults) -> None:
    """Run while the S3 server is frozen: SIGKILL a worker, record what was on disk then."""
    pid = kill_own_train_worker(address)
    files = checkpoint_files(server, cfg)
    reg = registered_dirs(server, cfg)
    faults.save_kill = {"pid": pid, "folder": cond.folder, "files_at_kill": files, "registered_at_kill": reg,
                        "whole_files": max((files.get(d, 0) for d in reg), default=0),
                        "registered_step_at_kill": registered_step(server, cfg), "t": time.time()}
    print(f"  fault: S3 server frozen, SIGKILL worker pid {pid} while {cond.folder} uploads "
          f"({files.get(cond.folder, 0)} files there)", flush=True)


# ---------------------------------------------------------------- runs


def run_cfg(base: Config, name: str, **train: Any) -> Config:
    cfg = base.model_copy(deep=True)
    cfg.train.run_name = name
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def train_checks(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    logged = [r["step"] for r in rows]
    return {"steps_logged_once": logged == list(range(1, steps + 1)), "last_step": logged[-1] if logged else 0,
            "start_steps": sorted({int(r.get("start_step", 0)) for r in rows}),
            "skipped_rows": sorted({int(r.get("skipped_rows", 0)) for r in rows}),
            "final_loss": rows[-1]["loss"] if rows else None}


def train(cfg: Config) -> tuple[dict[str, Any], float]:
    from recsys import train as train_mod

    t = time.perf_counter()
    summary = train_mod.run(cfg)
    return summary, time.perf_counter() - t


def evaluate(cfg: Config) -> tuple[dict[str, float], Any, float]:
    """The export on the test split: headline metrics per task, and the per-query table."""
    import pyarrow.parquet as pq

    from recsys import evaluate as evaluate_mod
    from recsys import storage

    t = time.perf_counter()
    out = evaluate_mod.run(cfg)
    fs, path = storage.filesystem(storage.join(out["report_dir"], evaluate_mod.PER_QUERY_FILE), cfg.storage)
    table = pq.read_table(path, filesystem=fs).to_pandas()
    return out["metrics"][SYSTEM], table[table["system"] == SYSTEM], time.perf_counter() - t


@dataclass
class Run:
    name: str
    seed: int
    workers: str
    train: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    train_wall_s: float = 0.0
    eval_wall_s: float = 0.0
    load_avg_before: list[float] = field(default_factory=list)
    load_avg_after: list[float] = field(default_factory=list)
    ok: bool = True
    problems: list[str] = field(default_factory=list)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def finish(run: Run, server: LocalS3Server, cfg: Config, steps: int, per_query: dict[str, Any], keep: bool) -> None:
    rows = rows_on_disk(server, cfg)
    run.checks.update(train_checks(rows, steps))
    if not run.checks["steps_logged_once"]:
        run.problems.append(f"steps logged {[r['step'] for r in rows]}")
    run.metrics, per_query[run.name], run.eval_wall_s = evaluate(cfg)
    run.load_avg_after = load()
    if not keep:  # ~0.4 GB per checkpoint of MiniLM with Adam state: the export and metrics stay
        for p in run_dir(server, cfg).glob("checkpoint_*"):
            shutil.rmtree(p, ignore_errors=True)
    run.ok = not run.problems
    print(f"[{run.name}] train {run.train_wall_s:.0f}s eval {run.eval_wall_s:.0f}s load {run.load_avg_after} "
          f"{'OK' if run.ok else 'PROBLEMS: ' + '; '.join(run.problems)}", flush=True)


def uninterrupted(base: Config, server: LocalS3Server, name: str, seed: int, steps: int, per_query: dict[str, Any],
                  keep: bool) -> Run:
    cfg = run_cfg(base, name, seed=seed)
    run = Run(name, seed, str(cfg.train.num_workers), load_avg_before=load())
    print(f"\n== {name}: uninterrupted, seed {seed}", flush=True)
    run.train, run.train_wall_s = train(cfg)
    if run.train.get("resumed_from_step"):
        run.problems.append(f"an uninterrupted run resumed from step {run.train['resumed_from_step']}")
    finish(run, server, cfg, steps, per_query, keep)
    return run


def faulted(base: Config, server: LocalS3Server, address: str, name: str, steps: int, every: int,
            per_query: dict[str, Any], keep: bool) -> Run:
    kill_steps = [round(steps * 0.25 / every) * every, round(steps * 0.5 / every) * every]
    save_step = round(steps * 0.75 / every) * every  # the save that gets the kill
    cfg = run_cfg(base, name, seed=0, max_failures=3)
    run = Run(name, 0, str(cfg.train.num_workers), load_avg_before=load())
    print(f"\n== {name}: seed 0, worker killed at steps {kill_steps}, and in the checkpoint save of step {save_step}", flush=True)
    faults = Faults()
    done = threading.Event()
    killer = threading.Thread(target=kill_at, args=(server, cfg, address, kill_steps, faults, done), daemon=True)
    cond = SaveStarted(server, cfg, faults, kills_first=len(kill_steps), armed_at=save_step - every)
    killer.start()
    watcher, outage = when(cond, lambda: frozen(server, lambda: save_kill(server, cfg, address, cond, faults), hold_s=1.0), done)
    try:
        run.train, run.train_wall_s = train(cfg)
    finally:
        done.set()
        killer.join(timeout=30)
        watcher.join(timeout=60)
    final_registered = registered_dirs(server, cfg)
    sk = faults.save_kill
    run.faults = {"kills": faults.kills, "save_kill": sk, "save_step": save_step, "kill_steps": kill_steps,
                  "frozen_s": round(outage.up_at - outage.down_at, 2) if outage.down_at else None,
                  "registered_at_end": final_registered, "error": faults.error or (repr(outage.error) if outage.error else None)}
    if faults.error or outage.error:
        run.problems.append(f"fault thread failed: {run.faults['error']}")
    if len(faults.kills) != len(kill_steps) or not all(k["pid"] for k in faults.kills):
        run.problems.append(f"{len(faults.kills)} of {len(kill_steps)} kills landed")
    if not sk or not sk.get("pid"):
        run.problems.append("the kill during a checkpoint save did not land")
    else:
        folder = sk["folder"]
        if folder in sk["registered_at_kill"] or folder in final_registered:
            run.problems.append(f"the partial checkpoint {folder} was registered")
        if sk["files_at_kill"].get(folder, 0) >= sk["whole_files"]:
            run.problems.append(f"{folder} was whole when the kill landed ({sk['files_at_kill'].get(folder)} files)")
    rows = rows_on_disk(server, cfg)
    resumed = run.train.get("resumed_from_step")
    # Three restarts: each attempt's start step (0, then one per fault); the last attempt resumed
    # from the last whole checkpoint before the interrupted save.
    run.checks["attempt_start_steps"] = sorted({int(r.get("start_step", 0)) for r in rows})
    if resumed != save_step - every:
        run.problems.append(f"resumed_from_step {resumed}, expected {save_step - every} (the last whole checkpoint before the interrupted save)")
    finish(run, server, cfg, steps, per_query, keep)
    return run


def regrid_data(cfg: Config, resumed_cfg: Config, half: int, steps: int) -> dict[str, Any]:
    """Which training examples W0 read, replayed outside training: the run's own dataset
    (recsys.train._train_dataset, order-preserving execution) split as Ray Train splits it
    (`streaming_split(n, equal=True)`) and read by each worker's recsys.stream.Stream: `cfg`'s
    workers consume `half` steps and save what they consumed (as a checkpoint does); the resume
    (`resumed_cfg`'s single worker, its batch size) loads that and trains the rest. Examples keyed by (kind, user, query,
    item, time); "already seen" counts rows read again in the epoch they were consumed in."""
    import tempfile

    import ray

    from recsys.stream import Stream, load_consumed
    from recsys.train import _ingest_options, _train_dataset

    t, t1 = cfg.train, resumed_cfg.train
    before = t.num_workers

    def key(b: dict[str, Any], i: int) -> str:
        return json.dumps([str(b[c][i]) for c in ("kind", "user_id", "query", "item_id", "timestamp")])

    def consume(stream: Stream, nbatches: int, out: list[tuple[int, str]]) -> None:
        for n, (epoch, b) in enumerate(stream, start=1):
            out += [(epoch, key(b, i)) for i in range(len(b["user_id"]))]
            if n >= nbatches:
                return

    ray.data.DataContext.get_current().execution_options = _ingest_options()
    total = _train_dataset(cfg).count()
    shards = _train_dataset(cfg).streaming_split(before, equal=True)
    streams = [Stream(shards[r], t.rows_per_batch, t.seed, r, too_small="too small") for r in range(before)]
    parts: list[list[tuple[int, str]]] = [[] for _ in range(before)]
    threads = [threading.Thread(target=consume, args=(streams[r], half * t.grad_accum, parts[r])) for r in range(before)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with tempfile.TemporaryDirectory() as d:
        for s in streams:
            s.save(d)
        resume = load_consumed(d)
    consumed = {k for part in parts for k in part}
    one: list[tuple[int, str]] = []
    resumed = Stream(_train_dataset(cfg).streaming_split(1, equal=True)[0], t1.rows_per_batch, t1.seed, 0,
                     too_small="too small", resume=resume, owner=True)
    consume(resumed, (steps - half) * t1.grad_accum, one)
    keys = {k for _, k in consumed}
    return {"train_examples": total, "consumed_before": len(consumed), "skipped_on_resume": resumed.skipped_rows,
            "trained_after_resume": len(one), "trained_after_resume_already_seen": len(set(one) & consumed),
            "never_seen": total - len(keys | {k for _, k in one})}


def resumed_cfg(base: Config, name: str, global_batch: str) -> Config:
    """W0's re-submission: 1 worker; `keep`: at twice the batch per worker (the global batch of
    the 2-worker first half, what the resume's warning advises), `per-worker`: the same."""
    t = base.train
    scale = 2 if global_batch == "keep" else 1  # the first half ran on 2 workers
    return run_cfg(base, name, seed=0, num_workers=1, max_failures=0, batch_size=t.batch_size * scale,
                   contrastive_batch=t.contrastive_batch * scale)


def regrid(base: Config, server: LocalS3Server, address: str, name: str, steps: int, every: int, first: str,
           global_batch: str, per_query: dict[str, Any], keep: bool) -> Run:
    half = round(steps * 0.5 / every) * every
    cfg2 = run_cfg(base, name, seed=0, num_workers=2, max_failures=0, **({"max_steps": half} if first == "budget" else {}))
    run = Run(name, 0, "2 then 1", load_avg_before=load())
    print(f"\n== {name}: seed 0, 2 workers to step {half} ({'stopped there' if first == 'kill' else 'max_steps ' + str(half)}), "
          f"re-submitted with 1 worker to step {steps}", flush=True)
    faults = Faults()
    done = threading.Event()
    stopper = None
    if first == "kill":
        stopper = threading.Thread(target=kill_at, args=(server, cfg2, address, [half], faults, done), daemon=True)
        stopper.start()
    t = time.perf_counter()
    first_error = None
    try:
        s1, _ = train(cfg2)
        run.train["first"] = s1
    except Exception as e:  # the stop: a killed worker with max_failures=0 fails the run
        first_error = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        done.set()
        if stopper is not None:
            stopper.join(timeout=30)
    first_wall = time.perf_counter() - t
    reg_first = registered_step(server, cfg2)
    if first == "kill" and (not faults.kills or first_error is None):
        run.problems.append(f"the stop at step {half} did not land (kills {faults.kills}, error {first_error})")
    cfg1 = resumed_cfg(base, name, global_batch)
    second, second_wall = train(cfg1)
    run.train.update(second)
    run.train_wall_s = first_wall + second_wall
    rows = rows_on_disk(server, cfg1)
    resumed = second.get("resumed_from_step")
    run.faults = {"first": first, "stop": faults.kills, "first_error": first_error, "registered_after_first": reg_first,
                  "first_wall_s": round(first_wall, 1), "second_wall_s": round(second_wall, 1)}
    if resumed != half:
        run.problems.append(f"resumed_from_step {resumed}, expected {half}")
    after = [r for r in rows if r["step"] > half]
    run.checks["data"] = regrid_data(cfg2, cfg1, half, steps)
    # The single worker walks past the consumed rows as it meets them (skipped_rows grows): by
    # the last step, as many as the replay outside training walked past.
    walked = max((int(r.get("skipped_rows", 0)) for r in after), default=0)
    run.checks["skipped_rows_in_training"] = walked
    if walked != run.checks["data"]["skipped_on_resume"]:
        run.problems.append(f"training walked past {walked} consumed rows, the replay {run.checks['data']['skipped_on_resume']}")
    print(f"  W0 data: {run.checks['data']}", flush=True)
    finish(run, server, cfg1, steps, per_query, keep)
    return run


# ---------------------------------------------------------------- comparison


def same_batches(server: LocalS3Server, base: Config, name: str, ref: str = "A0") -> str:
    """Steps whose batch digest (every rank's examples of that step, recsys.train._Meter) equals
    the reference run's at the same step, as "equal/steps"."""
    a, b = rows_on_disk(server, run_cfg(base, ref)), rows_on_disk(server, run_cfg(base, name))
    return f"{sum(x['batch_hash'] == y['batch_hash'] for x, y in zip(a, b, strict=False))}/{len(b)}"



def tasks_of(metrics: dict[str, float]) -> list[str]:
    return sorted({k.rsplit("/", 1)[0] for k in metrics if k.endswith("/" + METRICS[0])})


def compare(runs: dict[str, Run], per_query: dict[str, Any], ref: str = "A0", noise_run: str = "A1") -> dict[str, Any]:
    from recsys.significance import paired_comparison

    a0 = runs[ref]
    out: dict[str, Any] = {"seed_noise": {}, "rows": []}
    for task in tasks_of(a0.metrics):
        for m in METRICS:
            key = f"{task}/{m}"
            if key not in a0.metrics or key not in runs[noise_run].metrics:
                continue
            out["seed_noise"][key] = abs(runs[noise_run].metrics[key] - a0.metrics[key])
    base = per_query[ref]
    for name in [n for n in ("A1", "F0", "W0") if n in runs]:
        for task in tasks_of(a0.metrics):
            for m in METRICS:
                key = f"{task}/{m}"
                if key not in out["seed_noise"] or key not in runs[name].metrics:
                    continue
                a = base[base["task"] == task][["query_key", m]]
                b = per_query[name][per_query[name]["task"] == task][["query_key", m]]
                joined = b.merge(a, on="query_key", suffixes=("_x", "_ref"))
                if len(joined) != len(a) or len(joined) != len(b):
                    raise ValueError(f"{name} vs {ref} on {task}: queries do not match ({len(b)} vs {len(a)}, {len(joined)} paired)")
                r = paired_comparison(joined[f"{m}_x"].to_numpy(), joined[f"{m}_ref"].to_numpy())
                noise = out["seed_noise"][key]
                within = r["p_bootstrap"] > 0.05 and abs(r["diff"]) <= noise + 1e-12
                out["rows"].append({"run": name, "task": task, "metric": m, "ref": a0.metrics[key], "value": runs[name].metrics[key],
                                    "diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_bootstrap": r["p_bootstrap"],
                                    "p_ttest": r["p_ttest"], "n": r["n"], "seed_noise": noise,
                                    "within_noise": within if name != noise_run else None})
    return out


def table(cmp: dict[str, Any]) -> str:
    lines = ["| run vs A0 | task | metric | A0 | run | diff | 95% CI of diff | p (bootstrap) | p (t-test) | seed noise | within noise |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in cmp["rows"]:
        within = "-" if r["within_noise"] is None else "yes" if r["within_noise"] else "**no**"
        lines.append(f"| {r['run']} | {r['task'].split('/', 1)[-1]} ({r['n']} q) | {r['metric']} | {r['ref']:.4f} | {r['value']:.4f} | "
                     f"{r['diff']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['p_bootstrap']:.3f} | {r['p_ttest']:.3f} | "
                     f"{r['seed_noise']:.4f} | {within} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- main


def base_config(args: argparse.Namespace, server: LocalS3Server) -> Config:
    overrides = [
        # The stage Ray Train + DeepSpeed trains: the text towers (the demo's sequence tower is a
        # separate single-process stage after it, not under test here).
        "model.user_tower=text", "model.item_id_embeddings=false",
        f"train.max_steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}", "train.log_every=1",
        "train.keep_checkpoints=2", "train.max_failures=0", "train.eval_every=0",
        f"eval.systems=[{SYSTEM}]", "eval.ks=[10]", "eval.history_pool_items=0", "eval.split=test",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    cfg.storage = server.storage_config(f"s3://{BUCKET}/{args.prefix}")
    return cfg


def data_check_only(args: argparse.Namespace, s3_dir: Path) -> None:
    import ray

    from recsys.runtime import ensure_ray

    server = LocalS3Server(root=s3_dir)
    server.start()
    try:
        os.environ.update(server.env())
        base = base_config(args, server)
        cfg = run_cfg(base, "W0", seed=0, num_workers=2)
        ensure_ray(num_cpus=4, cfg=cfg, include_dashboard=False)
        half = round(args.steps * 0.5 / args.checkpoint_every) * args.checkpoint_every
        data = regrid_data(cfg, resumed_cfg(cfg, "W0", args.w0_global_batch), half, args.steps)
        print(json.dumps(data))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()
    if args.out and Path(args.out).exists():
        report = json.loads(Path(args.out).read_text())
        report["runs"]["W0"]["checks"]["data"] = data
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"merged into {args.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fault_noise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "jobs/configs/demo.yaml"), help="the data and model (any job config)")
    p.add_argument("--steps", type=int, default=80, help="step budget of every run")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--runs", default="A0,A1,F0,W0", help="subset of A0,A1,F0,W0 (A0 and A1 are needed for the comparison)")
    p.add_argument("--w0-first", choices=("kill", "budget"), default="kill",
                   help="W0's first submission: the full budget stopped at half (kill), or max_steps = half (budget)")
    p.add_argument("--w0-global-batch", choices=("keep", "per-worker"), default="keep",
                   help="W0's 1-worker re-submission: twice the batch per worker, keeping the global batch (keep), or the same "
                        "batch per worker, halving it (per-worker)")
    p.add_argument("--s3-dir", default=str(REPO / "runs/fault-noise-s3"), help="where the S3 server keeps its objects")
    p.add_argument("--prefix", default="demo", help="storage root under the bench's bucket (cleared at the start)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the runs' checkpoints (~0.4 GB each) on disk")
    p.add_argument("--data-check-only", action="store_true",
                   help="only replay which examples W0 reads (regrid_data) on data prepared by an earlier run in --s3-dir; "
                        "merged into --out as runs.W0.checks.data")
    p.add_argument("--out", default="", help="JSON report (e.g. docs/results/reliability/fault_noise.json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (data.*, model.*, train.*)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if set(names) - {"A0", "A1", "F0", "W0"}:
        p.error(f"--runs: unknown {sorted(set(names) - {'A0', 'A1', 'F0', 'W0'})}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("RAY_ADDRESS", None)  # a private cluster, never one found on the machine

    s3_dir = Path(args.s3_dir).absolute()
    if args.data_check_only:
        data_check_only(args, s3_dir)
        return
    shutil.rmtree(s3_dir / BUCKET / args.prefix, ignore_errors=True)  # same run names would silently resume
    t_all = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    server = LocalS3Server(root=s3_dir)
    server.start()
    runs: dict[str, Run] = {}
    per_query: dict[str, Any] = {}
    report: dict[str, Any] = {}
    try:
        server.make_bucket(BUCKET)
        os.environ.update(server.env())  # Ray's workers inherit it
        cfg = base_config(args, server)
        import ray

        from recsys.data import prepare
        from recsys.runtime import ensure_ray

        ensure_ray(num_cpus=4, cfg=cfg)
        address = ray.get_runtime_context().gcs_address
        print(f"S3 server pid {server.proc.pid if server.proc else '?'} at {server.endpoint}; Ray at {address}", flush=True)
        t = time.perf_counter()
        manifest = prepare.run(cfg)
        prepare_s = time.perf_counter() - t
        counts = manifest.get("counts", {})
        print(f"prepared in {prepare_s:.0f}s: {json.dumps(counts, default=str)[:600]}", flush=True)
        if "A0" in names:
            runs["A0"] = uninterrupted(cfg, server, "A0", 0, args.steps, per_query, args.keep_checkpoints)
        if "A1" in names:
            runs["A1"] = uninterrupted(cfg, server, "A1", 1, args.steps, per_query, args.keep_checkpoints)
        if "F0" in names:
            runs["F0"] = faulted(cfg, server, address, "F0", args.steps, args.checkpoint_every, per_query, args.keep_checkpoints)
        if "W0" in names:
            runs["W0"] = regrid(cfg, server, address, "W0", args.steps, args.checkpoint_every, args.w0_first,
                                args.w0_global_batch, per_query, args.keep_checkpoints)
        if "A0" in runs:
            for n, r in runs.items():
                r.checks["batches_equal_A0"] = same_batches(server, cfg, n)
        cmp = compare(runs, per_query) if {"A0", "A1"} <= set(runs) else {"seed_noise": {}, "rows": []}
        t = cfg.train
        report = {
            "command": "python -m bench.fault_noise " + " ".join(sys.argv[1:] if argv is None else argv),
            "started_utc": started.isoformat(timespec="seconds"), "wall_s": round(time.perf_counter() - t_all, 1),
            "hardware": {"cpus": os.cpu_count(), "cpu": cpu_model(), "gpu": None, "python": platform.python_version()},
            "data": {"config": str(args.config), "source": cfg.data.source, "users": cfg.data.synthetic_users,
                     "items": cfg.data.synthetic_items, "seed": cfg.data.seed, "counts": counts, "prepare_s": round(prepare_s, 1)},
            "model": {"name_or_path": cfg.model.name_or_path, "user_tower": cfg.model.user_tower, "task": t.task},
            "budget": {"max_steps": t.max_steps, "checkpoint_every": t.checkpoint_every, "batch_size_per_worker": t.batch_size,
                       "num_workers": t.num_workers, "zero_stage": t.zero_stage, "precision": t.precision, "lr": t.lr,
                       "warmup_steps": t.warmup_steps, "keep_checkpoints": t.keep_checkpoints},
            "storage": "checkpoints, examples and exports on a local rclone S3 server (loopback)",
            "within_noise_rule": "paired bootstrap p > 0.05 and |diff| <= seed noise |A1 - A0| (same task and metric)",
            "runs": {n: asdict(r) for n, r in runs.items()},
            **cmp,
        }
        print("\n" + table(cmp))
        print("\nseed noise |A1 - A0|: " + ", ".join(f"{k} {v:.4f}" for k, v in cmp["seed_noise"].items()))
        for n, r in runs.items():
            print(f"{n}: train {r.train_wall_s:.0f}s, eval {r.eval_wall_s:.0f}s, load {r.load_avg_before} -> {r.load_avg_after}, "
                  f"checks {r.checks}, {'OK' if r.ok else 'PROBLEMS: ' + '; '.join(r.problems)}")
        print(f"total {time.perf_counter() - t_all:.0f}s")
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            server.stop()
        if args.out and report:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
