"""Training the sequence user tower over the item tower's frozen catalog embeddings.

One record's way: a next-item example (history newest first, next item) becomes catalog rows
(`SequenceExamples.from_table`); each step the tower turns the history rows' text embeddings
into a user vector and the whole catalog's text embeddings into item vectors, and the loss is a
softmax of the next item against the catalog (`losses.full_softmax_loss`), or against the batch's
other items with logQ when the catalog is too big. Every epoch ranks the validation users over
the full catalog; the best epoch by NDCG@10 is kept and training stops after `patience` epochs
without a better one.

`fit` is the loop; `batches` feeds it. The Ray Train job feeds it from
`get_dataset_shard` (`run`), the sweep (bench/sequence_sweep.py) from memory; the step is the same.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from recsys.config import SequenceConfig
from recsys.losses import full_softmax_loss, sampled_softmax_loss
from recsys.metrics import average, per_query_metrics
from recsys.runtime import checkpoint_upload, fit_trainer
from recsys.sequence import SequenceCatalog, SequenceModel, SequenceTower
from recsys.sequence_joint import check_joint

log = logging.getLogger(__name__)

PAD = -1


def catalog_rows(
    histories: Sequence[Sequence[str] | None], targets: Sequence[str], row_of: dict[str, int], max_len: int, where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(hist (N, max_len) newest first, PAD after the last; target (N,)) as catalog rows. An item
    missing from the catalog is an error naming it (prepare only writes examples of catalog items)."""
    n = len(targets)
    hist = np.full((n, max_len), PAD, dtype=np.int64)
    target = np.empty(n, dtype=np.int64)
    for r, (h, t) in enumerate(zip(histories, targets, strict=True)):
        try:
            target[r] = row_of[t]
            rows = [row_of[i] for i in list(h if h is not None else [])[:max_len]]
        except KeyError as e:
            raise KeyError(f"{where}: row {r} names item {e.args[0]!r}, which is not in the catalog") from None
        hist[r, : len(rows)] = rows
    return hist, target


@dataclass
class SequenceExamples:
    hist: np.ndarray  # (N, L) int64 catalog rows, newest first, PAD after the last
    target: np.ndarray  # (N,) int64 catalog row of the next item
    weight: np.ndarray  # (N,) float32

    @classmethod
    def from_table(cls, table: pa.Table, item_ids: Sequence[str], max_len: int = 50, where: str = "examples") -> SequenceExamples:
        """Rows of a next-item examples table as catalog rows (`catalog_rows`)."""
        row_of = {i: k for k, i in enumerate(item_ids)}
        hist, target = catalog_rows(table.column("history").to_pylist(), table.column("item_id").to_pylist(), row_of, max_len, where)
        n = len(target)
        w = table.column("weight").to_numpy().astype(np.float32) if "weight" in table.column_names else np.ones(n, np.float32)
        return cls(hist, target, w)

    def __len__(self) -> int:
        return len(self.target)

    def batches(self, batch_size: int, seed: int) -> Iterable[dict[str, torch.Tensor]]:
        """A seeded shuffle of all rows, in batches of similar history length."""
        order = np.random.default_rng(seed).permutation(len(self))
        chunks = (self._take(order[s : s + batch_size * BUCKET_BATCHES]) for s in range(0, len(order), batch_size * BUCKET_BATCHES))
        yield from length_bucketed(chunks, batch_size, seed)

    def _take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"hist": self.hist[idx], "target": self.target[idx], "weight": self.weight[idx]}

    def histories(self) -> list[list[int]]:
        return [[int(x) for x in row if x != PAD] for row in self.hist]

    def rank(self, model: SequenceModel, text_emb: np.ndarray, item_ids: Sequence[str], k: int, batch: int = 2048,
             exclude_history: bool = False) -> list[list[str]]:
        """Full-catalog top-k item ids per example; history items excluded only when asked (the
        papers' protocol keeps them; eval.exclude_history)."""
        catalog = SequenceCatalog(model, text_emb, item_ids)  # the one history -> top-k, as served
        hists = self.histories()
        by_length = np.argsort([len(h) for h in hists], kind="stable")  # short rows batch together
        out: list[list[str]] = [[] for _ in hists]
        for s in range(0, len(hists), batch):
            idx = by_length[s : s + batch]
            rows = [hists[i] for i in idx]
            for i, (top, _) in zip(idx, catalog.rank(rows, k, exclude=rows if exclude_history else None), strict=True):
                out[i] = [item_ids[j] for j in top]
        return out

    def relevant(self, item_ids: Sequence[str]) -> list[dict[str, float]]:
        return [{item_ids[int(t)]: 1.0} for t in self.target]


BUCKET_BATCHES = 32  # batches' worth of rows sorted by length together


def length_bucketed(chunks: Iterable[dict[str, np.ndarray]], batch_size: int, seed: int) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of similar history length from shuffled chunks of rows (most histories are far
    shorter than max_len, and a batch costs as much as its longest row): each chunk is sorted by
    length, cut into batches, and those are yielded in a seeded random order."""
    rng = np.random.default_rng(seed)
    for c in chunks:
        order = np.argsort((c["hist"] != PAD).sum(1), kind="stable")
        parts = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        for k in rng.permutation(len(parts)):
            yield {name: torch.from_numpy(np.ascontiguousarray(v[parts[k]])) for name, v in c.items()}


def id_vocabulary(train: SequenceExamples, item_ids: Sequence[str]) -> dict[str, int]:
    """Item id -> ID-embedding row (1-based) for every item seen in training (history or
    target); the others (cold start) get none."""
    seen = np.unique(np.concatenate([train.target, train.hist[train.hist != PAD]]))
    return {item_ids[int(r)]: k + 1 for k, r in enumerate(seen)}


def tower_settings(scfg: SequenceConfig, item_ids: bool) -> dict[str, Any]:
    keys = ("dim", "layers", "heads", "ffn_dim", "dropout", "attention", "max_len", "adaptor", "experts", "adaptor_dropout")
    d = scfg.model_dump()
    return {**{k: d[k] for k in keys}, "item_ids": bool(item_ids)}


def step_loss(
    tower: torch.nn.Module, batch: dict[str, torch.Tensor], cat_emb: torch.Tensor, cat_ids: torch.Tensor,
    dup: torch.Tensor, scfg: SequenceConfig,
) -> torch.Tensor:
    """The loss of one batch. cat_emb (catalog, text_dim) frozen text embeddings; cat_ids
    (catalog,) ID-embedding row per catalog row (0 = none); dup (catalog,) duplicate group."""
    hist, target = batch["hist"], batch["target"]  # (batch, L), (batch,)
    hist = hist[:, : max(1, int((hist != PAD).sum(1).max()))]  # histories are left-aligned
    masked = hist if scfg.mask_history else None
    if cat_emb.shape[0] <= scfg.full_softmax_max_items:
        u, items = tower(cat_emb, cat_ids, hist)  # (batch, dim), (catalog, dim)
        return full_softmax_loss(u, items, target, scfg.temperature, masked=masked, dup_rows=dup, weights=batch.get("weight"))
    # Too big a catalog: only the batch's items, its other positives as negatives (logQ by
    # their share of the batch's positives).
    rows, inverse = torch.unique(torch.cat([target, hist[hist != PAD]]), return_inverse=True)
    local = torch.full_like(hist, PAD)
    local[hist != PAD] = inverse[target.numel():]
    u, items = tower(cat_emb[rows], cat_ids[rows], local)
    counts = torch.bincount(target, minlength=cat_emb.shape[0]).float()
    logq = torch.log(counts[target] / target.numel())
    return sampled_softmax_loss(u, items[inverse[: target.numel()]], temperature=scfg.temperature, weights=batch.get("weight"),
                                item_keys=target, dup_keys=dup[target], history_keys=masked, logq=logq, gather=True)


def validate(model: SequenceModel, valid: SequenceExamples, text_emb: np.ndarray, item_ids: Sequence[str],
             exclude_history: bool = False) -> dict[str, float]:
    ranked = valid.rank(model, text_emb, item_ids, 10, exclude_history=exclude_history)
    return average(per_query_metrics(ranked, valid.relevant(item_ids), [10]), "valid")


def _same_on_all_ranks(value: float) -> float:
    """Rank 0's value everywhere: every rank must take the same early-stopping decision, or the
    ones that go on would wait forever in the next all_reduce."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def fingerprint(scfg: SequenceConfig, item_id_embeddings: bool, id_of: dict[str, int], item_model_id: str) -> str:
    """What a checkpoint's tower depends on: its settings (not the epoch budget), its ID
    vocabulary and the item tower whose embeddings it reads. A checkpoint of another is not
    resumed."""
    import hashlib
    import json

    # The budgets are left out (a finished run given more epochs goes on), and so is the joint
    # stage, which the frozen tower does not depend on: a frozen run given joint steps goes on.
    joint = {k for k in SequenceConfig.model_fields if k.startswith("joint_")}
    settings = scfg.model_dump(exclude={"max_epochs", "patience", "num_workers", "cpus_per_worker", *joint})
    blob = json.dumps([settings, bool(item_id_embeddings), sorted(id_of.items()), item_model_id], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit(
    scfg: SequenceConfig, train: SequenceExamples, text_emb: np.ndarray, item_ids: Sequence[str], dup: np.ndarray,
    valid: SequenceExamples | None = None, seed: int = 0, item_id_embeddings: bool = False,
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]] | None = None,
    wrap: Callable[[SequenceTower], torch.nn.Module] | None = None,
    state: dict[str, Any] | None = None, on_epoch: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    id_of: dict[str, int] | None = None, exclude_history: bool = False,
) -> tuple[SequenceModel, dict[str, Any]]:
    """Train a tower; returns the best epoch's model and the history (epochs, metrics, timing).

    `batches(epoch)` yields the epoch's batches (default: a seeded shuffle of `train`); `wrap`
    wraps the tower for distributed training (DDP); `state` resumes from an `on_epoch` state;
    `on_epoch(row, state)` is called after every epoch (the Ray job reports and checkpoints)."""
    torch.manual_seed(seed)
    id_of = id_of if id_of is not None else id_vocabulary(train, item_ids)
    tower = SequenceTower(tower_settings(scfg, item_id_embeddings), int(text_emb.shape[1]), len(id_of))
    model_view = wrap(tower) if wrap else tower
    opt = torch.optim.AdamW(tower.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
    cat_emb = torch.from_numpy(np.ascontiguousarray(text_emb, dtype=np.float32))
    cat_ids = torch.tensor([id_of.get(i, 0) for i in item_ids], dtype=torch.long)
    dup_t = torch.from_numpy(np.asarray(dup, dtype=np.int64))
    feed = batches or (lambda ep: train.batches(scfg.batch_size, seed * 100_003 + ep))
    hist: dict[str, Any] = {"rows": [], "best_epoch": -1, "best": -1.0, "epochs": 0, "params": tower.trainable_parameters()}
    best_state = copy.deepcopy(tower.state_dict())
    start = 0
    if state:
        tower.load_state_dict(state["tower"])
        opt.load_state_dict(state["opt"])
        best_state, hist, start = state["best_tower"], state["history"], int(state["epoch"]) + 1
    hist["start_epoch"] = start
    since_best = start - 1 - hist["best_epoch"] if start else 0
    # A finished run (stopped early) re-run as is stays finished: the same best epoch exported.
    first = scfg.max_epochs if state and state.get("stopped") else start
    for epoch in range(first, scfg.max_epochs):
        t = time.perf_counter()
        tower.train()
        total, n = 0.0, 0
        for b in feed(epoch):
            loss = step_loss(model_view, b, cat_emb, cat_ids, dup_t, scfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            n += 1
        row: dict[str, Any] = {"epoch": epoch, "loss": total / max(n, 1), "steps": n, "epoch_s": round(time.perf_counter() - t, 2)}
        if valid is not None:
            m = validate(SequenceModel(tower, id_of), valid, text_emb, item_ids, exclude_history)
            tower.train()
            row.update(m)
            score = _same_on_all_ranks(m["valid/ndcg@10"])
            if score > hist["best"]:
                hist["best"], hist["best_epoch"], since_best = score, epoch, 0
                best_state = copy.deepcopy(tower.state_dict())
            else:
                since_best += 1
        else:
            hist["best_epoch"], best_state = epoch, copy.deepcopy(tower.state_dict())
        hist["rows"].append(row)
        hist["epochs"] = epoch + 1
        log.info("sequence epoch %d: loss %.4f%s (%.1fs)", epoch, row["loss"],
                 f", valid NDCG@10 {row['valid/ndcg@10']:.4f}" if valid is not None else "", row["epoch_s"])
        stop = valid is not None and since_best >= scfg.patience
        if on_epoch:
            on_epoch(row, {"tower": tower.state_dict(), "opt": opt.state_dict(), "best_tower": best_state,
                           "history": hist, "epoch": epoch, "id_of": id_of, "stopped": stop})
        if stop:
            break
    tower.load_state_dict(best_state)
    return SequenceModel(tower, id_of), hist


# ---- the Ray Train job ----------------------------------------------------------------------

STATE_FILE = "sequence_state.pt"


def _to_rows(batch: dict[str, np.ndarray], row_of: dict[str, int], max_len: int) -> dict[str, np.ndarray]:
    hist, target = catalog_rows(batch["history"], batch["item_id"], row_of, max_len, "next-item training examples")
    return {"hist": hist, "target": target, "weight": np.asarray(batch["weight"], dtype=np.float32)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: batches from `get_dataset_shard`, every rank reports each epoch, rank 0
    attaches the checkpoint; a restarted group resumes from `ray.train.get_checkpoint()`."""
    import os
    import tempfile

    import ray
    import ray.train
    import ray.train.torch

    from recsys.config import Config
    from recsys.runtime import print_progress

    cfg = Config.model_validate(config["cfg"])
    scfg = cfg.sequence
    torch.set_num_threads(max(1, int(scfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        print_progress(log)
    data = ray.get(config["data"][0])  # in a list: Ray resolves a bare ref only as a direct argument
    shard = ray.train.get_dataset_shard("train")
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=False)
        if state.get("fingerprint") != data["fingerprint"]:
            # A checkpoint of other settings, data or item tower (the text stage retrained it):
            # continuing it would train a different model than the config says, so start again.
            log.warning("rank %d: the checkpoint's tower (%s) is not this config's (%s): starting afresh", rank,
                        state.get("fingerprint"), data["fingerprint"])
            state = None
        else:
            log.info("rank %d resuming after epoch %d", rank, state["epoch"])

    def batches(epoch: int, batch_size: int = scfg.batch_size) -> Iterable[dict[str, torch.Tensor]]:
        seed = scfg.seed * 100_003 + epoch
        chunks = shard.iter_batches(batch_size=batch_size * BUCKET_BATCHES, batch_format="numpy",
                                    local_shuffle_buffer_size=batch_size * BUCKET_BATCHES, local_shuffle_seed=seed)
        return length_bucketed(chunks, batch_size, seed)

    last: dict[str, Any] = dict(state or {})  # the frozen stage's latest state: joint checkpoints carry it

    def report(metrics: dict[str, Any], st: dict[str, Any]) -> None:
        metrics = {**metrics, "rank": rank, "world": world}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({**st, "fingerprint": data["fingerprint"]}, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_upload_fn=checkpoint_upload(cfg))
        else:
            ray.train.report(metrics)

    def on_epoch(row: dict[str, Any], st: dict[str, Any]) -> None:
        last.clear()
        last.update(st)
        report(row, st)

    wrap = ray.train.torch.prepare_model if world > 1 else None
    model, hist = fit(scfg, data["train"], data["emb"], data["item_ids"], data["dup"], valid=data["valid"], seed=scfg.seed,
                      item_id_embeddings=cfg.model.item_id_embeddings, batches=batches, wrap=wrap, state=state,
                      on_epoch=on_epoch, id_of=data["id_of"], exclude_history=cfg.eval.exclude_history)
    if not scfg.joint_steps:
        return
    from recsys.features import ItemTokens
    from recsys.model import build_two_tower, load_tokenizer
    from recsys.sequence_joint import fit_joint

    encoder = build_two_tower(cfg.model)
    encoder.load_state_dict(ray.get(data["encoder"][0]))
    tokens = ItemTokens(data["texts"], load_tokenizer(cfg.model), cfg.model)
    fit_joint(scfg, model, encoder, tokens, data["item_ids"], data["dup"], data["valid"],
              lambda epoch: batches(10_000 + epoch, scfg.joint_batch_size), wrap=wrap, baseline=hist["best"],
              on_eval=lambda row, st: report(row, {**last, "joint_state": st}), exclude_history=cfg.eval.exclude_history,
              state=(state or {}).get("joint_state"))


def run(cfg: Any) -> dict[str, Any]:
    """Train the sequence tower over the item tower's catalog embeddings and export both.

    The item tower is the pretrained encoder (`sequence.item_tower=base`) or the text towers
    the text stage just fine-tuned into the export (`fine_tuned`); either way it is frozen
    here, and its catalog embeddings are made once by Ray Data batch inference."""
    import shutil
    import tempfile

    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from recsys import paths, storage
    from recsys.catalog_index import embed_catalog
    from recsys.config import redacted, to_dict
    from recsys.encoder import RECSYS_META
    from recsys.evaluate import _read_dir
    from recsys.items import read_items
    from recsys.runtime import ensure_ray
    from recsys.sequence import SequenceTower, attach_sequence_tower

    t0 = time.perf_counter()
    scfg = cfg.sequence
    ensure_ray(cfg=cfg)
    items = read_items(paths.items(cfg), cfg.storage)
    item_ids: list[str] = items.column("item_id").to_pylist()
    check_joint(cfg, len(item_ids))
    export = paths.export_dir(cfg)
    work = Path(tempfile.mkdtemp(prefix="recsys-sequence-"))
    try:
        if scfg.item_tower == "fine_tuned":
            if not storage.exists(storage.join(export, RECSYS_META), cfg.storage):
                raise FileNotFoundError(f"sequence.item_tower=fine_tuned needs the text stage's export at {export}; it is missing")
            local = work / "export"
            storage.download_dir(export, str(local), cfg.storage) if storage.is_remote(export) else shutil.copytree(export, local)
            shutil.rmtree(local / "sequence", ignore_errors=True)
        else:
            from recsys.model import _write_export, build_two_tower, load_tokenizer

            local = work / "export"
            local.mkdir()
            _write_export(build_two_tower(cfg.model), load_tokenizer(cfg.model), cfg.model, redacted(cfg), local)
        log.info("embedding %d catalog items with the %s item tower", len(item_ids), scfg.item_tower)
        emb, item_model_id = embed_catalog(cfg, str(local), items, storage.join(paths.run_dir(cfg), "sequence_item_embeddings"))
        data: dict[str, Any] = {"emb": emb, "item_ids": item_ids, "item_model_id": item_model_id,
                                "dup": items.column("dup_group").to_numpy().astype(np.int64)}
        for split in ("train", "valid"):
            t = _read_dir(paths.examples(cfg, "next_item", split), cfg)
            if t is None or t.num_rows == 0:
                raise FileNotFoundError(f"no next-item {split} examples under {paths.examples(cfg, 'next_item', split)}: run the prepare job first")
            data[split] = SequenceExamples.from_table(t, item_ids, scfg.max_len, where=f"next-item {split} examples")
        item_encoder = None
        if scfg.joint_steps:  # the end-to-end stage starts from the item tower the frozen one read
            from recsys.model import build_two_tower

            item_encoder = build_two_tower(cfg.model.model_copy(update={"name_or_path": str(local)}))
            data["encoder"] = [ray.put(item_encoder.state_dict())]
            data["texts"] = items.column("text").to_pylist()
        data["id_of"] = id_vocabulary(data["train"], item_ids)
        data["fingerprint"] = fingerprint(scfg, cfg.model.item_id_embeddings, data["id_of"], item_model_id)
        row_of = {i: k for k, i in enumerate(item_ids)}
        files = storage.list_files(paths.examples(cfg, "next_item", "train"), cfg.storage, ".parquet")
        fs, _ = storage.filesystem(cfg.storage.root, cfg.storage)
        ds = ray.data.read_parquet([storage.filesystem(f, cfg.storage)[1] for f in files], filesystem=fs)
        ds = ds.random_shuffle(seed=scfg.seed).map_batches(
            _to_rows, fn_kwargs={"row_of": row_of, "max_len": scfg.max_len}, batch_format="numpy")
        train_fs, storage_path = storage.train_filesystem(cfg.storage.root, cfg.storage)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": to_dict(cfg), "data": [ray.put(data)]},
            scaling_config=ScalingConfig(num_workers=scfg.num_workers, use_gpu=False,
                                         resources_per_worker={"CPU": scfg.cpus_per_worker}),
            datasets={"train": ds},
            run_config=RunConfig(name=f"{cfg.train.run_name}-sequence", storage_path=storage_path, storage_filesystem=train_fs,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        )
        result = fit_trainer(trainer)
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=False)
        hist = state["history"]
        tower = SequenceTower(tower_settings(scfg, cfg.model.item_id_embeddings), int(emb.shape[1]), len(state["id_of"]))
        tower.load_state_dict(state["best_tower"])
        # A checkpoint of an earlier run with joint steps, re-run with none, is the frozen stage's.
        joint = state.get("joint_state") if scfg.joint_steps else None
        improved = joint is not None and joint["best_encoder"] is not None
        if improved and item_encoder is not None:
            # The joint stage beat the frozen one: its encoder is the export's item tower now.
            from recsys.model import _write_export, load_tokenizer

            tower.load_state_dict(joint["best_tower"])
            item_encoder.load_state_dict(joint["best_encoder"])
            _write_export(item_encoder, load_tokenizer(cfg.model), cfg.model, redacted(cfg), local,
                          training={"sequence_joint_best_step": joint["history"]["best_step"]})
        model_id = attach_sequence_tower(local, tower, state["id_of"],
                                         sequence_item_tower=f"{scfg.item_tower}+joint" if improved else scfg.item_tower,
                                         sequence_joint_best_step=joint["history"]["best_step"] if improved else 0)
        storage.replace_dir(str(local), export, cfg.storage, marker=RECSYS_META)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = hist["rows"][hist["best_epoch"]] if hist["best_epoch"] >= 0 else {}
    summary = {
        "user_tower": "sequence", "item_tower": scfg.item_tower, "epochs": hist["epochs"], "best_epoch": hist["best_epoch"],
        "best_valid_ndcg@10": best.get("valid/ndcg@10"), "trainable_parameters": hist["params"],
        "resumed_from_epoch": hist.get("start_epoch", 0),
        "train_examples": len(data["train"]), "export": export, "model_id": model_id,
        **({"joint_steps": joint["history"]["steps"], "joint_best_step": joint["history"]["best_step"],
            "joint_best_valid_ndcg@10": joint["history"]["best"], "joint_improved": joint["best_encoder"] is not None,
            "joint_trainable_parameters": joint["history"]["params"]} if joint else {}),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    log.info("sequence tower trained: %s", summary)
    return summary
