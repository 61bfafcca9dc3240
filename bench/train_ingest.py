"""Training data path: Ray Data -> a Ray Train worker vs plain pyarrow + tokenizer in one process.

Synthesises N example rows shaped like prepare's examples parquet (EXAMPLES_SCHEMA: kind,
user_id, query, history item ids, item_id, weight, ...; half search, half next-item) over a
synthetic item table (ITEMS_SCHEMA, texts of 10-30 words), in K parquet shards on local disk
laid out as prepare writes them, so recsys.train's own dataset construction
(`recsys.train._train_dataset`) and `ItemTable.load` read them unchanged. Then measures, no model:

  plain      pyarrow.dataset read + recsys.features.collate (features + to_tensors, the code the
             train workers run) in this process, batches of B rows: examples/s
  ray        `_train_dataset(cfg)` -> TorchTrainer with 1 worker whose loop iterates
             `get_dataset_shard("train").iter_batches(...)` as recsys.train._stream does and
             collates as train_loop_per_worker does (tokenize_in=worker: collate in the worker;
             pipeline: Featurize actors, the worker only pads with to_tensors): examples/s and
             the time it waits for each batch (the real loop's data wait: fetch + collate)
  step       the same, with the worker sleeping --step-ms per batch (a simulated GPU step):
             data wait / step time

and prints the ratio ray/plain. The default --step-ms is a bert-base bf16 step on one H100 for
the batch the plain arm measured: 6 x 110e6 params x padded tokens per batch / (0.45 x 989e12).

    python -m bench.train_ingest --rows 1000000 [--shards 16] [--batch 256] [--arms plain,worker,pipeline]
           [--actors 2 --actor-cpus 0.5 --read-blocks 16 --read-cpus 0.25 --prefetch 4 ...]

Every arm's numbers are printed as one JSON line too (`RESULT {...}`), for the tuning log.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BERT_BASE_PARAMS = 110e6
H100_BF16_DENSE_FLOPS = 989e12
MFU = 0.45


def h100_step_ms(tokens_per_batch: float) -> float:
    """Training FLOPs ~ 6 x params x tokens (forward 2, backward 4; attention's extra FLOPs at
    <= 256 tokens are a few per cent and left out), at 45% of the H100's dense bf16 peak."""
    return 6 * BERT_BASE_PARAMS * tokens_per_batch / (MFU * H100_BF16_DENSE_FLOPS) * 1000


class CpuMeter:
    """CPU seconds used by this process and every process under it (the local Ray cluster's
    GCS, raylet, workers and actors), sampled each second so processes that exit mid-arm
    (Featurize actors, read tasks' workers) still count. On a machine shared with other work,
    CPU seconds per example compare arms fairly where wall time does not."""

    def __init__(self) -> None:
        import threading

        import psutil

        self._psutil = psutil
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.series: list[tuple[float, float]] = []  # (time.time(), CPU seconds so far)
        self._stop = threading.Event()
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, initial: bool = False) -> None:
        me = self._psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            used = t.user + t.system
            # Processes started during the arm count from zero.
            self.first.setdefault(proc.pid, used if initial else 0.0)
            self.last[proc.pid] = used
        self.series.append((time.time(), self.total()))

    def total(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last)

    def between(self, t0: float, t1: float) -> float:
        """CPU seconds used between two time.time() stamps (to the nearest 1 s sample)."""
        def at(t: float) -> float:
            return min(self.series, key=lambda s: abs(s[0] - t))[1]

        return at(t1) - at(t0)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.total()


def _kill_failed_start() -> None:
    """After a failed ray.init, ray.shutdown() knows no node to stop, and the GCS, dashboard and
    agents that init started live on: stop them by PID, found by the session folder Ray names
    after this process's PID (only what this process started)."""
    import re

    import psutil

    mine = re.compile(rf"session_[0-9_-]+_{os.getpid()}(/|$)")
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] != os.getpid() and any(mine.search(a) for a in proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()


def _vocab(tokenizer: Any) -> np.ndarray:
    """Whole-word, alphabetic entries of the tokenizer's vocabulary: text that tokenises like
    product copy (mostly one token a word); model codes added in `_items` split into several."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 3]
    return np.array(sorted(words), dtype=object)


def _items(n: int, vocab: np.ndarray, rng: np.random.Generator) -> pa.Table:
    from recsys.schemas import ITEMS_SCHEMA

    lengths = rng.integers(10, 31, n)
    words = vocab[rng.integers(0, len(vocab), int(lengths.sum()))]
    cuts = np.cumsum(lengths)[:-1]
    codes = [f"{chr(65 + i % 26)}{i % 977}-{i % 89}x" for i in range(n)]
    texts = [f"{' '.join(ws)} {c}" for ws, c in zip(np.split(words, cuts), codes, strict=True)]
    ids = [f"P{i}" for i in range(n)]
    return pa.table(
        {
            "item_id": ids,
            "title": [t[:60] for t in texts],
            "brand": pa.array(vocab[rng.integers(0, len(vocab), n)].tolist()),
            "category": pa.array(vocab[rng.integers(0, 50, n)].tolist()),
            "price": rng.uniform(1, 500, n),
            "text": texts,
            "dup_group": np.arange(n, dtype=np.int64),
            "popularity": rng.zipf(1.5, n).clip(0, 10**6).astype(np.int64),
        },
        schema=ITEMS_SCHEMA,
    )


def _examples(rows: int, kind: str, item_ids: pa.Array, queries: np.ndarray, max_history: int,
              rng: np.random.Generator) -> pa.Table:
    from recsys.schemas import EXAMPLES_SCHEMA

    n_items = len(item_ids)
    # Popular items recur (zipf-like ranks), as in a shop's logs.
    def draw(k: int) -> np.ndarray:
        return (rng.pareto(1.2, k) * n_items / 50).astype(np.int64) % n_items

    lengths = rng.integers(0 if kind == "search" else 1, max_history + 1, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    history = pa.ListArray.from_arrays(pa.array(offsets), item_ids.take(pa.array(draw(int(lengths.sum())))))
    users = rng.integers(0, max(1, rows // 20), rows)
    t0 = np.datetime64("2026-06-01T00:00:00", "ms").astype(np.int64)
    return pa.table(
        {
            "kind": pa.array([kind] * rows),
            "user_id": pa.array(np.char.add("U", users.astype(str)).astype(object)),
            "query": pa.array(queries[rng.integers(0, len(queries), rows)]) if kind == "search" else pa.nulls(rows, pa.string()),
            "history": history,
            "item_id": item_ids.take(pa.array(draw(rows))),
            "weight": pa.array(np.ones(rows, dtype=np.float32)),
            "timestamp": pa.array(t0 + rng.integers(0, 60 * 86400 * 1000, rows), pa.timestamp("ms", tz="UTC")),
            "relevance": pa.nulls(rows, pa.float32()),
        },
        schema=EXAMPLES_SCHEMA,
    )


def synthesise(root: Path, rows: int, shards: int, n_items: int, cfg: Any, seed: int = 0) -> None:
    """Items + `rows` examples in `shards` parquet files (half search, half next-item) under
    `root`, as prepare lays them out; kept and reused when `root` holds this size already."""
    from recsys import paths
    from recsys.model import load_tokenizer

    marker = root / "bench.json"
    spec = {"rows": rows, "shards": shards, "items": n_items, "seed": seed, "max_history": cfg.data.max_history}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    vocab = _vocab(load_tokenizer(cfg.model))
    items = _items(n_items, vocab, rng)
    items_dir = Path(paths.items(cfg))
    items_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(items, items_dir / "part-00000.parquet")
    qlen = rng.integers(1, 6, 50_000)
    qwords = vocab[rng.integers(0, len(vocab), int(qlen.sum()))]
    queries = np.array([" ".join(w) for w in np.split(qwords, np.cumsum(qlen)[:-1])], dtype=object)
    ids = items.column("item_id").combine_chunks()
    per = rows // shards
    for s in range(shards):
        kind = ("search", "next_item")[s % 2]
        out = Path(paths.examples(cfg, kind, "train"))
        out.mkdir(parents=True, exist_ok=True)
        n = per + (rows - per * shards if s == shards - 1 else 0)
        # Row groups of ~64k rows, like a prepare shard's.
        pq.write_table(_examples(n, kind, ids, queries, cfg.data.max_history, rng), out / f"part-{s:05d}.parquet",
                       row_group_size=65_536)
    marker.write_text(json.dumps(spec))
    size = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    print(f"synthesised {rows:,} examples in {shards} shards + {n_items:,} items, {size / 2**20:.0f} MiB, "
          f"in {time.perf_counter() - t:.1f}s", flush=True)


def _files(cfg: Any) -> list[str]:
    from recsys import paths

    return sorted(str(p) for k in ("next_item", "search") for p in Path(paths.examples(cfg, k, "train")).glob("*.parquet"))


def plain(cfg: Any, batch: int, max_rows: int, warmup: int) -> dict[str, Any]:
    """pyarrow.dataset -> numpy batches of `batch` rows -> recsys.features.collate, one process."""
    import pyarrow.dataset as pads

    from recsys.features import BatchTokens, collate, hard_negatives_for
    from recsys.items import ItemTable
    from recsys.model import load_tokenizer

    cpu = CpuMeter()
    t0 = time.perf_counter()
    items = ItemTable.load(cfg)
    tokenizer = load_tokenizer(cfg.model)
    negatives = hard_negatives_for(items, cfg)
    caches = BatchTokens(items, tokenizer, cfg.model)  # the token-id caches the trainer keeps across batches
    t_setup = time.perf_counter() - t0
    cols = ["kind", "user_id", "query", "history", "item_id", "weight"]
    dataset = pads.dataset(_files(cfg), format="parquet")
    n, tokens, pending = 0, [], []
    t_warm, n_warm = time.time(), 0
    t1 = time.perf_counter()
    collate_s = 0.0
    for rb in dataset.to_batches(columns=cols, batch_size=batch):
        pending.append(rb)
        have = sum(len(b) for b in pending)
        while have >= batch and n < max_rows:
            table = pa.Table.from_batches(pending).combine_chunks()
            head, rest = table.slice(0, batch), table.slice(batch)
            pending = rest.to_batches()
            have -= batch
            np_batch = {c: head.column(c).to_numpy(zero_copy_only=False) for c in cols}
            c0 = time.perf_counter()
            t = collate(np_batch, items, tokenizer, cfg, negatives, caches)
            collate_s += time.perf_counter() - c0
            tokens.append(t["q_ids"].numel() + t["d_ids"].numel() + (t["h_ids"].numel() if "h_ids" in t else 0))
            n += batch
            if n == warmup * batch:
                t_warm, n_warm = time.time(), n
        if n >= max_rows:
            break
    wall = time.perf_counter() - t1
    t_end = time.time()
    cpu_s = cpu.stop()
    steady_cpu = cpu.between(t_warm, t_end)
    return {"arm": "plain", "rows": n, "wall_s": wall, "setup_s": t_setup, "examples_per_s": n / wall,
            "cpu_s": cpu_s, "cpu_ms_per_example": 1000 * cpu_s / max(n, 1),
            "steady_cpu_ms_per_example": 1000 * steady_cpu / max(n - n_warm, 1),
            "steady_examples_per_s": (n - n_warm) / max(t_end - t_warm, 1e-9),
            "collate_share": collate_s / wall, "tokens_per_batch": float(np.mean(tokens)),
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset")}


def _iter(shard: Any, t: Any, bench: dict[str, Any]) -> Any:
    """recsys.train._stream's iter_batches (one epoch), with the tunables the bench varies;
    their defaults are _stream's arguments (and Ray's prefetch_batches=1)."""
    return shard.iter_batches(
        batch_size=t.rows_per_batch, batch_format=bench["batch_format"], drop_last=True,
        local_shuffle_buffer_size=(max(4 * t.rows_per_batch, 256) if bench["local_shuffle"] else None),
        local_shuffle_seed=t.seed, prefetch_batches=bench["prefetch"],
    )


def _loop(config: dict[str, Any]) -> None:
    """The train function: the real loop's data handling (fetch -> collate / to_tensors, timed
    as its _Meter does), no model; sleeps step_ms per batch when simulating a step."""
    import ray.train

    from recsys.config import config_from_dict
    from recsys.features import BatchTokens, collate, hard_negatives_for, to_tensors
    from recsys.items import ItemTable
    from recsys.model import load_tokenizer

    cfg = config_from_dict(config["cfg"])
    bench = config["bench"]
    t = cfg.train
    items = ItemTable.load(cfg)
    negatives = hard_negatives_for(items, cfg)
    tokenizer = load_tokenizer(cfg.model)
    caches = BatchTokens(items, tokenizer, cfg.model)  # as recsys.train's worker keeps them
    pad_id = tokenizer.pad_token_id or 0
    step_s = bench["step_ms"] / 1000
    waits: list[float] = []
    n = 0
    shard = ray.train.get_dataset_shard("train")
    if bench["loop"] == "stream":
        # The trainer's own iterator (recsys.stream.Stream: --prefetch, default Ray's 1, the local
        # shuffle buffer, re-batching, and the row hashes a resume walks past), one epoch.
        import itertools

        from recsys.stream import Stream

        # Stream runs epochs for ever: a full pass stops at epoch 1's first batch, whose wait
        # is not timed (t_last below).
        # As recsys.train: pre-tokenised batches are padded in Ray's fetch threads (Stream's prepare).
        pad = functools.partial(to_tensors, pad_id=pad_id, padding_side=tokenizer.padding_side) if t.tokenize_in == "pipeline" else None
        first_epoch = itertools.takewhile(lambda eb: eb[0] == 0, Stream(shard, t.rows_per_batch, t.seed, 0, too_small="no full batch",
                                                                             prefetch_batches=bench["prefetch"], prepare=pad))
        stream = (b for _, b in first_epoch)
    else:
        stream = iter(_iter(shard, t, bench))
    t_start = time.perf_counter()
    t_first = None
    t_warm_wall = time.time()
    while n < bench["max_rows"]:
        t_fetch = time.perf_counter()
        try:
            batch = next(stream)
        except StopIteration:
            break
        if bench["loop"] == "iter" and bench["batch_format"] == "pyarrow":
            batch = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in batch.column_names}
        if bench["loop"] == "stream" and t.tokenize_in == "pipeline":
            tensors = batch  # padded by Stream's prepare
        else:
            tensors = (to_tensors(batch, pad_id, tokenizer.padding_side) if t.tokenize_in == "pipeline"
                       else collate(batch, items, tokenizer, cfg, negatives, caches))
        waits.append(time.perf_counter() - t_fetch)
        if t_first is None:
            t_first = time.perf_counter()
        n += len(tensors["weights"])
        if len(waits) == bench["warmup_batches"]:
            t_warm_wall = time.time()
        if step_s:
            time.sleep(step_s)
        # The end is the last batch handled, not the StopIteration: with --loop stream that
        # comes only after the next epoch's run has started.
        t_last, t_last_wall = time.perf_counter(), time.time()
    t_end = t_last if waits else time.perf_counter()
    skip = bench["warmup_batches"]
    steady = waits[skip:]
    steady_n = n - skip * t.rows_per_batch
    steady_s = sum(steady) + step_s * len(steady)
    out = {
        "rows": n, "batches": len(waits), "first_batch_s": (t_first or t_end) - t_start,
        "wall_s": t_end - t_start,
        "examples_per_s": n / (t_end - t_start),
        # After the first `warmup_batches`: the pipeline's start-up (actors, first blocks) excluded.
        "steady_examples_per_s": steady_n / max(steady_s, 1e-9),
        "wait_ms_median": 1000 * statistics.median(steady) if steady else None,
        "wait_ms_p90": 1000 * float(np.percentile(steady, 90)) if steady else None,
        "wait_share": (sum(steady) / steady_s) if steady else None,
        "t_warm": t_warm_wall, "t_end": t_last_wall if waits else time.time(),
    }
    Path(bench["out"]).write_text(json.dumps(out))
    ray.train.report({"rows": n})


def ray_arm(cfg: Any, bench: dict[str, Any], read_args: dict[str, Any], featurize_args: dict[str, Any],
            storage_path: str, name: str) -> dict[str, Any]:
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from recsys.config import to_dict
    from recsys.runtime import fit_trainer
    from recsys.train import _ingest_options, _train_dataset

    cpu = CpuMeter()
    t0 = time.perf_counter()
    ds = _train_dataset(cfg, read_args=read_args, featurize_args=featurize_args)
    out = Path(storage_path) / f"{name}.json"
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"cfg": to_dict(cfg), "bench": {**bench, "out": str(out)}},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options=_ingest_options()),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )
    result = fit_trainer(trainer)
    if result.error:
        raise result.error
    cpu_s = cpu.stop()
    got = json.loads(out.read_text())
    steady_rows = got["rows"] - bench["warmup_batches"] * cfg.train.rows_per_batch
    got["steady_cpu_ms_per_example"] = 1000 * cpu.between(got.pop("t_warm"), got.pop("t_end")) / max(steady_rows, 1)
    return {"arm": f"ray/{cfg.train.tokenize_in}", **got, "fit_wall_s": time.perf_counter() - t0,
            # The whole fit (Train controller, worker start, dataset start-up included).
            "cpu_s": cpu_s, "cpu_ms_per_example": 1000 * cpu_s / max(got["rows"], 1),
            "step_ms": bench["step_ms"], "shuffle": cfg.train.shuffle, "read_args": read_args,
            "featurize_args": {k: v for k, v in featurize_args.items() if k != "compute"},
            "actors": cfg.train.tokenize_actors, "actor_cpus": cfg.train.tokenize_cpus,
            # Stream has its own iter_batches arguments: the bench's knobs do not apply to it.
            "batch_format": bench["batch_format"] if bench["loop"] == "iter" else None,
            "prefetch": bench["prefetch"], "loop": bench["loop"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256, help="rows per worker batch (train.batch_size; jobs/configs/train_cluster.yaml: 256)")
    p.add_argument("--max-query-tokens", type=int, default=256, help="train_cluster.yaml's model.max_query_tokens")
    p.add_argument("--max-item-tokens", type=int, default=128, help="train_cluster.yaml's model.max_item_tokens")
    p.add_argument("--arms", default="plain,worker,pipeline",
                   help="comma list of plain, worker, pipeline, worker+step, pipeline+step (repeats allowed)")
    p.add_argument("--max-rows", type=int, default=0, help="stop each data arm after this many rows (0 = all)")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated step; 0 = the H100 estimate from the plain arm's tokens")
    p.add_argument("--step-batches", type=int, default=300, help="batches of a +step arm")
    p.add_argument("--warmup-batches", type=int, default=5)
    p.add_argument("--shuffle", default="local", choices=["local", "global"],
                   help="train.shuffle; local = no Ray all-to-all, the same work as the plain arm")
    p.add_argument("--no-local-shuffle", action="store_true", help="iter_batches without the local shuffle buffer")
    p.add_argument("--actors", type=int, default=1, help="train.tokenize_actors")
    p.add_argument("--actor-cpus", type=float, default=0.5, help="train.tokenize_cpus")
    p.add_argument("--featurize-batch", type=int, default=0, help="Featurize map_batches batch_size (0 = train's max(64, batch))")
    p.add_argument("--read-blocks", type=int, default=0, help="read_parquet override_num_blocks (0 = Ray's choice)")
    p.add_argument("--read-cpus", type=float, default=0.0, help="read tasks' num_cpus (0 = Ray's default 1)")
    p.add_argument("--batch-format", default="numpy", choices=["numpy", "pyarrow"])
    p.add_argument("--prefetch", type=int, default=1, help="iter_batches prefetch_batches (Ray's default 1; with --loop stream, Stream's)")
    p.add_argument("--loop", default="iter", choices=["iter", "stream"],
                   help="iter: iter_batches with this bench's knobs (--prefetch, --batch-format, --no-local-shuffle); "
                        "stream: the trainer's recsys.stream.Stream, row hashes included")
    p.add_argument("--tokenizer-threads", type=int, default=0,
                   help="> 0: TOKENIZERS_PARALLELISM=true and RAYON_NUM_THREADS=N in the Ray processes (default: off, as training)")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local cluster (ensure_ray's default on 2 cores: 4)")
    p.add_argument("--root", default="runs/bench-train-ingest")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    # On a loaded machine the raylet gave up waiting for its dashboard agent and aborted
    # (node_manager.cc WaitForDashboardAgentPorts, "Check failed"): give the agent longer.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    if args.tokenizer_threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = str(args.tokenizer_threads)
    from recsys.config import load_config

    root = Path(args.root).absolute() / f"{args.rows}x{args.shards}"
    cfg = load_config(None, [
        f"storage.root={root}", "model.name_or_path=bundled", "train.task=both",
        f"train.batch_size={args.batch}", f"model.max_query_tokens={args.max_query_tokens}",
        f"model.max_item_tokens={args.max_item_tokens}", f"train.shuffle={args.shuffle}",
        f"train.tokenize_actors={args.actors}", f"train.tokenize_cpus={args.actor_cpus}",
    ])
    synthesise(root, args.rows, args.shards, args.items, cfg)
    max_rows = args.max_rows or args.rows
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    results: list[dict[str, Any]] = []
    step_ms = args.step_ms
    read_args: dict[str, Any] = {}
    if args.read_blocks:
        read_args["override_num_blocks"] = args.read_blocks
    if args.read_cpus:
        read_args["ray_remote_args"] = {"num_cpus": args.read_cpus}
    featurize_args: dict[str, Any] = {}
    if args.featurize_batch:
        featurize_args["batch_size"] = args.featurize_batch
    contention = os.getloadavg()[0]
    ray_up = False
    tmp = tempfile.TemporaryDirectory(prefix="train-ingest-")
    try:
        for i, arm in enumerate(arms):
            if arm == "plain":
                r = plain(cfg, args.batch, max_rows, args.warmup_batches)
                if not args.step_ms:
                    step_ms = h100_step_ms(r["tokens_per_batch"])
                r["h100_step_ms"] = h100_step_ms(r["tokens_per_batch"])
            else:
                mode, _, step = arm.partition("+")
                if mode not in ("worker", "pipeline") or step not in ("", "step"):
                    raise SystemExit(f"--arms: unknown arm {arm!r}")
                if not ray_up:
                    from recsys.runtime import ensure_ray

                    ray_up = True  # from here on, `finally` shuts down whatever ray.init started
                    for attempt in range(3):
                        try:
                            ensure_ray(num_cpus=args.ray_cpus, cfg=cfg, include_dashboard=False)
                            break
                        except Exception:  # on a loaded machine the raylet can miss Ray's fixed 30 s to register
                            import ray

                            ray.shutdown()
                            _kill_failed_start()
                            if attempt == 2:
                                raise
                            time.sleep(10)
                if step and not step_ms:
                    raise SystemExit("a +step arm needs --step-ms or a plain arm before it")
                run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"tokenize_in": mode})})
                bench = {"loop": args.loop, "batch_format": args.batch_format, "prefetch": args.prefetch, "local_shuffle": not args.no_local_shuffle,
                         "step_ms": step_ms if step else 0.0, "warmup_batches": args.warmup_batches,
                         "max_rows": args.step_batches * args.batch if step else max_rows}
                r = ray_arm(run_cfg, bench, read_args, featurize_args, tmp.name, f"arm{i}-{mode}{'-step' if step else ''}")
            r["load_avg_1m"] = os.getloadavg()[0]
            results.append(r)
            print("RESULT " + json.dumps(r), flush=True)
    finally:
        if ray_up:
            import ray

            ray.shutdown()
        tmp.cleanup()

    print(f"\n{args.rows:,} rows, {args.shards} shards, batch {args.batch}, max tokens {args.max_query_tokens}/{args.max_item_tokens}, "
          f"cores={os.cpu_count()}, load average at start {contention:.1f}")
    print(f"{'arm':22s} {'examples/s':>11s} {'steady ex/s':>12s} {'CPU ms/ex':>10s} {'steady CPU':>11s} {'wait ms p50':>12s} {'wait share':>11s} {'wall s':>8s}")
    plains = [r["examples_per_s"] for r in results if r["arm"] == "plain"]
    for r in results:
        name = r["arm"] + ("+step" if r.get("step_ms") else "")
        wait = f"{r['wait_ms_median']:.1f}" if r.get("wait_ms_median") is not None else "-"
        share = f"{100 * r['wait_share']:.1f}%" if r.get("step_ms") else "-"  # without a step, waiting is all it does
        print(f"{name:22s} {r['examples_per_s']:11.0f} {r.get('steady_examples_per_s', r['examples_per_s']):12.0f} {r['cpu_ms_per_example']:10.2f} {r['steady_cpu_ms_per_example']:11.2f} "
              f"{wait:>12s} {share:>11s} {r['wall_s']:8.1f}")
    if plains:
        ref = statistics.mean(plains)
        cpu_ref = statistics.mean(r["steady_cpu_ms_per_example"] for r in results if r["arm"] == "plain")
        tok = statistics.mean(r["tokens_per_batch"] for r in results if r["arm"] == "plain")
        print(f"\npadded tokens per batch {tok:.0f}: bert-base bf16 H100 step = 6 x 110e6 x {tok:.0f} / (0.45 x 989e12) "
              f"= {h100_step_ms(tok):.1f} ms = {args.batch / h100_step_ms(tok) * 1000:.0f} examples/s per GPU")
        for r in results:
            if r["arm"] != "plain" and not r.get("step_ms"):
                print(f"ratio {r['arm']}/plain: {r['examples_per_s'] / ref:.2f}x end to end, "
                      f"{r['steady_examples_per_s'] / ref:.2f}x steady (goal >= 0.8x); CPU per example "
                      f"{r['steady_cpu_ms_per_example'] / cpu_ref:.2f}x plain's (steady)")
    for r in results:
        if r.get("step_ms"):
            print(f"{r['arm']} with a {r['step_ms']:.1f} ms step: data wait {100 * r['wait_share']:.1f}% of step time (goal < 5%)")


if __name__ == "__main__":
    main()
