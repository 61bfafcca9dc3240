"""Training soak: one long Ray Train + DeepSpeed run, its RSS and step time watched over time.

    python -m bench.train_soak [--duration-s 1800] [--sample-s 30] [--window-s 300]
        [--config jobs/configs/demo.yaml] [--set section.key=value ...]
        [--checkpoint-every 50] [--warmup-steps 20] [--max-steps 0] [--out FILE.json]

Starts its own private local Ray cluster (own temp dir, dashboard on a loopback port), prepares
the dataset of `--config` (default: the demo's synthetic shop, bundled MiniLM) on local storage in
a temp dir, and trains the text towers (model.user_tower=text: the Ray Train + DeepSpeed stage)
with 2 workers, a row in the metrics file every step and a checkpoint every `--checkpoint-every`
steps (saved and uploaded: part of what must not leak).

`train.max_steps` is chosen so the run lasts about `--duration-s`: a short warm-up run first
(`--warmup-steps`, checkpointing twice) measures the step time, the checkpoint cost and the fixed
start-up / export cost; `--max-steps N` skips it. The run then ends by itself (nothing is killed);
sampling goes on until it does.

While it runs, every `--sample-s`: the RSS (psutil) of each live RayTrainWorker, the
TrainController and the other actors of the cluster (Ray's state API over this cluster's GCS
address), of this driver, the storage root's size on disk and the 1-minute load average. The
metrics file is polled every 2 s; each row is timed when first seen. A row's step time is
the examples per step over its examples/s (so the row after a checkpoint carries the save).

Report per `--window-s` window: steps done, median step time and examples/s, median data-wait
share, RSS per worker (the window's last sample), the mean load average, the checkpoint steps.
Overall: each process's RSS slope in MiB/min (least squares over the samples after the first
`--warmup-s`, default one window), the step-time slope in % per 10 min (least squares over the
steps after warm-up, checkpoint-carrying rows left out) and its Spearman rank correlation with
the load average (per sample interval: the median step time of the rows seen in it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.faults import complete_rows

POLL_S = 2.0
WORKER, CONTROLLER = "RayTrainWorker", "TrainController"


# ---------------------------------------------------------------- bookkeeping (no Ray needed)


def slope_per_min(t_s: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of y over time, per minute; None with fewer than 2 distinct times."""
    import numpy as np

    if len(y) < 2 or len(set(t_s)) < 2:
        return None
    return float(np.polyfit(np.asarray(t_s, dtype=float) / 60.0, np.asarray(y, dtype=float), 1)[0])


def theil_sen_per_min(t_s: Sequence[float], y: Sequence[float]) -> float | None:
    """Theil-Sen slope per minute (the median of pairwise slopes): robust to the few samples
    that land inside a checkpoint save; None with fewer than 2 distinct times."""
    from scipy.stats import theilslopes

    if len(y) < 2 or len(set(t_s)) < 2:
        return None
    return float(theilslopes(list(y), [t / 60.0 for t in t_s]).slope)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties: average ranks); None with < 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def step_rows(rows: Sequence[dict[str, Any]], seen_at: dict[int, float], examples_per_step: int,
              checkpoint_every: int) -> list[dict[str, Any]]:
    """One record per metrics row: its time (first seen, s since the run started), step time,
    examples/s, data-wait share, and whether it carries the previous step's checkpoint save."""
    out = []
    for r in sorted(rows, key=lambda r: r["step"]):
        eps = float(r.get("examples_per_s") or 0.0)
        step_s = examples_per_step / eps if eps > 0 else float("nan")
        wait = float(r.get("data_wait_s") or 0.0)
        out.append({
            "step": int(r["step"]), "t_s": seen_at.get(int(r["step"])),
            "step_s": step_s, "examples_per_s": eps, "data_wait_share": wait / step_s if step_s > 0 else float("nan"),
            "loss": r.get("loss"),
            # The save of step k happens in its report, inside the interval of the row k + 1.
            "after_checkpoint": int(r["step"]) > 1 and (int(r["step"]) - 1) % checkpoint_every == 0,
        })
    return out


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x == x]  # no NaN
    return statistics.median(xs) if xs else None


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def windows(steps: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], window_s: float,
            end_s: float) -> list[dict[str, Any]]:
    """Per window [k * window_s, (k + 1) * window_s) up to `end_s`: the steps first seen in it
    (count, median step time / examples/s / data-wait share, the checkpoint-carrying rows' median
    step time), the RSS of every process at the window's last sample, and the mean load average."""
    n = max(1, int(-(-end_s // window_s)))
    out = []
    for k in range(n):
        lo, hi = k * window_s, (k + 1) * window_s
        hi_in = hi if k < n - 1 else float("inf")  # the last window holds what came at end_s
        mine = [s for s in steps if s["t_s"] is not None and lo <= s["t_s"] < hi_in]
        plain = [s for s in mine if not s["after_checkpoint"]]
        ckpt = [s for s in mine if s["after_checkpoint"]]
        smp = [s for s in samples if lo <= s["t_s"] < hi_in]
        loads = [s["load_1m"] for s in smp]
        out.append({
            "window": k + 1, "t_start_s": lo, "t_end_s": min(hi, end_s),
            "steps": len(mine), "last_step": max((s["step"] for s in mine), default=None),
            "median_step_s": _r(_median([s["step_s"] for s in plain])),
            "median_examples_per_s": _r(_median([s["examples_per_s"] for s in plain]), 2),
            "median_data_wait_share": _r(_median([s["data_wait_share"] for s in plain]), 4),
            "checkpoint_rows": len(ckpt), "median_checkpoint_step_s": _r(_median([s["step_s"] for s in ckpt])),
            "rss_mib": dict(smp[-1]["rss_mib"]) if smp else {},
            "load_1m_mean": _r(statistics.fmean(loads), 2) if loads else None,
        })
    return out


def summarize(steps: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Overall figures after warm-up: RSS slope per process (MiB/min), the step-time slope
    (s/min and % per 10 min of the mean), and its rank correlation with the load average."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    rss: dict[str, dict[str, Any]] = {}
    for label in sorted({k for s in samples for k in s["rss_mib"]}):
        pts = [(s["t_s"], s["rss_mib"][label]) for s in after if label in s["rss_mib"]]
        every = [(s["t_s"], s["rss_mib"][label]) for s in samples if label in s["rss_mib"]]
        slope = slope_per_min([t for t, _ in pts], [m for _, m in pts])
        robust = theil_sen_per_min([t for t, _ in pts], [m for _, m in pts])
        rss[label] = {
            "first_mib": every[0][1] if every else None, "after_warmup_mib": pts[0][1] if pts else None,
            "end_mib": every[-1][1] if every else None, "max_mib": max((m for _, m in every), default=None),
            "slope_mib_per_min": _r(slope), "theil_sen_mib_per_min": _r(robust), "mib_per_day_at_slope": _r(slope * 1440, 1) if slope is not None else None,
            "samples": len(every), "samples_after_warmup": len(pts),
        }
    fit = [s for s in steps if s["t_s"] is not None and s["t_s"] >= warmup_s and not s["after_checkpoint"] and s["step_s"] == s["step_s"]]
    step_slope = slope_per_min([s["t_s"] for s in fit], [s["step_s"] for s in fit])
    mean_step = statistics.fmean(s["step_s"] for s in fit) if fit else None
    # Per sample interval: the median step time of the rows first seen in it vs the load then.
    pairs = []
    prev = 0.0
    for s in samples:
        mine = [x["step_s"] for x in fit if prev <= x["t_s"] < s["t_s"]]
        if mine and s["t_s"] >= warmup_s:
            pairs.append((statistics.median(mine), s["load_1m"]))
        prev = s["t_s"]
    ckpt = [s for s in steps if s["t_s"] is not None and s["t_s"] >= warmup_s and s["after_checkpoint"]]
    return {
        "warmup_s": warmup_s,
        "rss": rss,
        "steps_after_warmup": len(fit),
        "step_s_mean_after_warmup": _r(mean_step),
        "step_s_median_after_warmup": _r(_median([s["step_s"] for s in fit])),
        "step_s_slope_s_per_min": _r(step_slope, 5),
        "step_s_slope_pct_per_10min": _r(100 * 10 * step_slope / mean_step, 2) if step_slope is not None and mean_step else None,
        "step_s_vs_load_spearman": _r(spearman([a for a, _ in pairs], [b for _, b in pairs])),
        "step_s_vs_load_pairs": len(pairs),
        "checkpoint_step_s_slope_pct_per_10min": _checkpoint_trend(ckpt),
        "load_1m_mean_after_warmup": _r(statistics.fmean(s["load_1m"] for s in after), 2) if after else None,
        "load_1m_range": [min(s["load_1m"] for s in samples), max(s["load_1m"] for s in samples)] if samples else None,
    }


def _checkpoint_trend(ckpt: Sequence[dict[str, Any]]) -> float | None:
    """% per 10 min of the checkpoint-carrying rows' step time (does saving slow down?)."""
    slope = slope_per_min([s["t_s"] for s in ckpt], [s["step_s"] for s in ckpt])
    if slope is None:
        return None
    mean = statistics.fmean(s["step_s"] for s in ckpt)
    return _r(100 * 10 * slope / mean, 2) if mean else None


def estimate_max_steps(warm_rows: Sequence[dict[str, Any]], wall_s: float, duration_s: float, examples_per_step: int,
                       checkpoint_every: int, warm_checkpoint_every: int, skip: int = 3) -> dict[str, Any]:
    """max_steps for a run of `duration_s` from a warm-up run's rows (checkpointed every
    `warm_checkpoint_every` steps) and wall time: the median plain step after `skip` steps, plus
    the checkpoint cost spread over the soak's `checkpoint_every` steps; the fixed cost
    (start-up, export) is the warm-up's wall time less its steps."""
    steps = step_rows(warm_rows, {}, examples_per_step, checkpoint_every=max(1, warm_checkpoint_every))
    plain = [s["step_s"] for s in steps[skip:] if not s["after_checkpoint"]] or [s["step_s"] for s in steps]
    ckpt = [s["step_s"] for s in steps if s["after_checkpoint"]]
    step_s = statistics.median(plain)
    save_s = max(0.0, statistics.median(ckpt) - step_s) if ckpt else 0.0
    fixed_s = max(0.0, wall_s - sum(s["step_s"] for s in steps))
    return {"step_s": round(step_s, 3), "checkpoint_extra_s": round(save_s, 2), "fixed_s": round(fixed_s, 1),
            "per_step_s": round(step_s + save_s / checkpoint_every, 3),
            "max_steps": max(10, int((duration_s - fixed_s) / (step_s + save_s / checkpoint_every)))}


# ---------------------------------------------------------------- the run




def _processes(gcs: str) -> dict[str, int]:
    """label -> PID of this cluster's live actors: each RayTrainWorker and the TrainController
    ("<class>:<pid>"), the others by class."""
    from ray.util.state import list_actors

    out: dict[str, int] = {}
    for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        if a.pid:
            out[f"{a.class_name}:{a.pid}"] = a.pid
    return out


def _rss(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for label, pid in pids.items():
        try:
            out[label] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.Error:
            continue
    return out


def _du_mib(root: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
    return round(total / 2**20, 1)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {os.getloadavg()}"


def _examples_per_step(cfg: Any) -> int:
    t = cfg.train
    return t.rows_per_batch * t.num_workers * t.grad_accum


def _train(cfg: Any) -> tuple[dict[str, Any], float]:
    from recsys import train

    t0 = time.monotonic()
    return train.run(cfg), time.monotonic() - t0


def soak(cfg: Any, gcs: str, sample_s: float, ceiling_s: float) -> dict[str, Any]:
    """Run `recsys.train.run(cfg)` in a thread; sample until it ends. Past `ceiling_s` sampling
    stops and the run is reported as overrunning, but it is still waited for: it ends by itself
    (its steps are fixed up front), nothing is killed here."""
    from recsys import paths

    metrics = Path(paths.metrics_file(cfg))
    root = Path(cfg.storage.root)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"], outcome["wall_s"] = _train(cfg)
        except BaseException as e:  # noqa: BLE001 - reported, not swallowed
            outcome["error"] = f"{type(e).__name__}: {e}"

    import psutil

    me = psutil.Process()
    thread = threading.Thread(target=target, name="train-soak", daemon=True)
    t0 = time.monotonic()
    thread.start()
    seen_at: dict[int, float] = {}
    samples: list[dict[str, Any]] = []
    try:
        before = _processes(gcs)  # e.g. a warm-up run's controller and dataset actors, still alive
    except Exception:  # noqa: BLE001
        before = {}
    next_sample = t0 + sample_s
    while thread.is_alive() and time.monotonic() - t0 < ceiling_s:
        thread.join(POLL_S)
        now = time.monotonic()
        for r in complete_rows(metrics):
            seen_at.setdefault(int(r["step"]), round(now - t0, 1))
        if now >= next_sample:
            next_sample += sample_s
            try:
                pids = _processes(gcs)
            except Exception as e:  # noqa: BLE001 - the state API can time out under load
                print(f"sample at {now - t0:.0f}s: list_actors failed: {e}", flush=True)
                pids = {}
            rss = _rss(pids)
            rss["driver"] = round(me.memory_info().rss / 2**20, 1)
            samples.append({"t_s": round(now - t0, 1), "load_1m": round(os.getloadavg()[0], 2), "rss_mib": rss,
                            "pids": pids, "disk_mib": _du_mib(root), "last_step": max(seen_at, default=0)})
            workers = {k: v for k, v in rss.items() if k.startswith(WORKER)}
            print(f"t={now - t0:6.0f}s step {max(seen_at, default=0):5d} load {samples[-1]['load_1m']:5.2f} "
                  f"workers {workers} controller {[v for k, v in rss.items() if k.startswith(CONTROLLER)]} "
                  f"disk {samples[-1]['disk_mib']} MiB", flush=True)
    overran = thread.is_alive()
    if overran:
        print(f"past the ceiling of {ceiling_s:.0f}s: sampling stopped, waiting for the run to end by itself", flush=True)
        thread.join()
    end_s = time.monotonic() - t0
    for r in complete_rows(metrics):
        seen_at.setdefault(int(r["step"]), round(end_s, 1))
    return {"rows": complete_rows(metrics), "seen_at": seen_at, "samples": samples, "end_s": round(end_s, 1),
            "overran": overran, "present_before": sorted(before), **outcome}


def print_report(rep: dict[str, Any]) -> None:
    ws, s = rep["windows"], rep["summary"]
    workers = sorted({k for w in ws for k in w["rss_mib"] if k.startswith(WORKER)})
    old = set(rep.get("present_before_soak") or [])
    ctrl = sorted({k for w in ws for k in w["rss_mib"] if k.startswith(CONTROLLER) and k not in old})
    print(f"\n{'win':>3s} {'t_end':>6s} {'steps':>5s} {'step_s':>7s} {'ex/s':>6s} {'wait%':>6s} {'ckpt':>4s} {'ckpt_s':>7s} "
          f"{'load':>5s} " + " ".join(f"{k[:22]:>22s}" for k in workers + ctrl))
    for w in ws:
        rss = " ".join(f"{w['rss_mib'].get(k, float('nan')):22.1f}" for k in workers + ctrl)
        share = w["median_data_wait_share"]
        print(f"{w['window']:3d} {w['t_end_s']:6.0f} {w['steps']:5d} {w['median_step_s'] or 0:7.3f} {w['median_examples_per_s'] or 0:6.1f} "
              f"{100 * (share or 0):6.2f} {w['checkpoint_rows']:4d} {w['median_checkpoint_step_s'] or 0:7.2f} {w['load_1m_mean'] or 0:5.2f} {rss}")
    for k, v in s["rss"].items():
        print(f"RSS {k:36s} {v['first_mib']} -> {v['after_warmup_mib']} -> {v['end_mib']} MiB, slope {v['slope_mib_per_min']} "
              f"(Theil-Sen {v['theil_sen_mib_per_min']}) MiB/min{' [before the soak]' if k in old else ''}")
    print(f"step time after warm-up: median {s['step_s_median_after_warmup']} s, slope {s['step_s_slope_pct_per_10min']} % / 10 min, "
          f"Spearman vs load {s['step_s_vs_load_spearman']} ({s['step_s_vs_load_pairs']} intervals)")


def _config(args: argparse.Namespace, root: Path, run_name: str, max_steps: int, checkpoint_every: int) -> Any:
    from recsys.config import load_config

    return load_config(args.config, [
        f"storage.root={root}", "model.user_tower=text", f"train.num_workers={args.workers}", "train.log_every=1",
        f"train.checkpoint_every={checkpoint_every}", f"train.max_steps={max_steps}", f"train.run_name={run_name}",
        "train.eval_every=0", *args.set,
    ])


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--duration-s", type=float, default=1800.0, help="target length of the soak run")
    p.add_argument("--sample-s", type=float, default=30.0, help="RSS / load sampling period")
    p.add_argument("--window-s", type=float, default=300.0, help="report window")
    p.add_argument("--warmup-s", type=float, default=None, help="left out of the slopes (default: one window)")
    p.add_argument("--config", default="jobs/configs/demo.yaml")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides section.key=value")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--warmup-steps", type=int, default=20, help="steps of the step-time warm-up run")
    p.add_argument("--max-steps", type=int, default=0, help="skip the warm-up run and train this many steps")
    p.add_argument("--ceiling-factor", type=float, default=3.0, help="stop sampling (not the run) after this x --duration-s")
    p.add_argument("--out", default="runs/bench/train_soak.json")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, checkpoints, metrics)")
    a = p.parse_args(argv)
    warmup_s = a.window_s if a.warmup_s is None else a.warmup_s

    import ray

    from recsys.data import prepare
    from recsys.runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)  # a private local cluster, never someone else's
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="rsoak-"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    uptime_start = _uptime()
    print(f"uptime at start: {uptime_start}", flush=True)
    report: dict[str, Any] = {"started": started, "uptime_start": uptime_start, "cpus": os.cpu_count(), "argv": list(argv or [])}
    try:
        cfg = _config(a, tmp / "store", "soak", max(1, a.max_steps or 1), a.checkpoint_every)
        ensure_ray(cfg=cfg, _temp_dir=str(tmp / "ray"))
        gcs = ray.get_runtime_context().gcs_address
        t = time.monotonic()
        manifest = prepare.run(cfg)
        report["prepare_s"] = round(time.monotonic() - t, 1)
        counts = manifest.get("counts", manifest)
        report["data"] = {k: v for k, v in counts.items() if isinstance(v, int | float | str | dict)} if isinstance(counts, dict) else {}
        eps = _examples_per_step(cfg)
        if a.max_steps:
            estimate: dict[str, Any] = {"max_steps": a.max_steps, "given": True}
        else:
            half = max(1, a.warmup_steps // 2)
            wcfg = _config(a, tmp / "store", "soak-warmup", a.warmup_steps, half)
            print(f"warm-up run: {a.warmup_steps} steps, a checkpoint every {half}", flush=True)
            wsum, wall = _train(wcfg)
            from recsys import paths

            estimate = estimate_max_steps(complete_rows(Path(paths.metrics_file(wcfg))), wall, a.duration_s, eps, a.checkpoint_every, half)
            estimate.update(warmup_wall_s=round(wall, 1), warmup_steps=a.warmup_steps, warmup_summary_wall_s=wsum.get("wall_s"))
            shutil.rmtree(paths.run_dir(wcfg), ignore_errors=True)  # its checkpoint: disk, not the soak's
        report["estimate"] = estimate
        cfg = _config(a, tmp / "store", "soak", estimate["max_steps"], a.checkpoint_every)
        print(f"soak run: {estimate['max_steps']} steps for ~{a.duration_s:.0f}s ({estimate})", flush=True)
        res = soak(cfg, gcs, a.sample_s, a.ceiling_factor * a.duration_s)
        steps = step_rows(res["rows"], res["seen_at"], eps, a.checkpoint_every)
        report.update({
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "uptime_end": _uptime(),
            "model": cfg.model.name_or_path, "config": a.config, "overrides": a.set,
            "train": {"workers": cfg.train.num_workers, "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
                      "batch_size_per_worker": cfg.train.batch_size, "examples_per_step": eps, "task": cfg.train.task,
                      "max_steps": cfg.train.max_steps, "checkpoint_every": cfg.train.checkpoint_every,
                      "keep_checkpoints": cfg.train.keep_checkpoints, "log_every": cfg.train.log_every},
            "run_s": res["end_s"], "overran": res["overran"], "error": res.get("error"),
            # Actors alive before the soak's own run started (not the soak's processes).
            "present_before_soak": res["present_before"],
            "train_summary": {k: v for k, v in (res.get("summary") or {}).items() if k not in ("export", "checkpoint", "metrics_file")},
            "steps_done": max((s["step"] for s in steps), default=0),
            "windows": windows(steps, res["samples"], a.window_s, res["end_s"]),
            "summary": summarize(steps, res["samples"], warmup_s),
            "disk_mib": [[s["t_s"], s["disk_mib"]] for s in res["samples"]],
            "samples": res["samples"],
            "steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()} for s in steps],
        })
        print(f"uptime at end: {report['uptime_end']}", flush=True)
        print_report(report)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"written to {out}", flush=True)
    if report.get("overran"):
        print(f"the run outlasted {a.ceiling_factor:g} x --duration-s: the samples stop there", flush=True)
    if report.get("error") or "summary" not in report:
        raise SystemExit(f"soak run failed: {report.get('error') or 'no report'}")


if __name__ == "__main__":
    main()
