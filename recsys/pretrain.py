"""Domain-adaptive pretraining: masked-language-model continued pretraining of the encoder on the
shop's own text, before contrastive tuning (Gururangan et al. 2020, "Don't Stop Pretraining";
Recformer, Li et al. 2023, pretrains on item text sequences).

    run(cfg) -> summary dict (first / final MLM loss, steps, tokens, output path)

The corpus (Ray Data, built in the driver; `pretrain.sources`):
- "items": every catalog item's text (prepare's items table). The catalog is what the shop
  shows; it holds no interaction labels, so all of it is fair game (as for BM25's index).
- "queries": the distinct queries of the search examples' TRAIN split.
- "histories": the next-item TRAIN split's user texts (history item texts, newest first, as the
  user tower reads them: `encoder.render_user_text`).
Only `paths.examples(cfg, kind, "train")` is ever read: the valid and test splits' queries and
histories never reach the model (`corpus_uris` lists every file read; the test asserts it).

Ray Train workers (`TorchTrainer`) each take `get_dataset_shard("train")`, tokenise to
`pretrain.max_tokens`, mask with transformers' `DataCollatorForLanguageModeling` (seeded per step
and rank, so a resumed run masks as an uninterrupted one), and step a DeepSpeed engine over
`AutoModelForMaskedLM` of `model.name_or_path` (ZeRO stage / precision from `train.*`, torch
AdamW, linear warm-up and decay). Every rank reports; checkpoints every
`pretrain.checkpoint_every` steps; a re-run resumes from `ray.train.get_checkpoint()` and walks
past the batches already consumed. At the end the base encoder WITHOUT its MLM head, plus the
tokenizer, is written to `paths.pretrained(cfg)`, a folder `AutoModel.from_pretrained` opens and
the train stage reads as `model.name_or_path` (jobs.pipeline chains it when pretrain.enabled).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys import paths, storage
from recsys.config import Config, config_from_dict, redacted, to_dict, to_yaml
from recsys.runtime import checkpoint_upload, fit_trainer
from recsys.stream import Stream, load_consumed
from recsys.train import (
    _all_ranks_digest,
    _global_mean,
    _ingest_options,
    _lr_lambda,
    _read_metrics,
    _write_metrics,
    deepspeed_config,
    load_engine_checkpoint,
    param_groups,
    resume_layout,
)

log = logging.getLogger(__name__)

DS_TAG = "ds"
STATE_FILE = "recsys_pretrain_state.json"
# In the output folder: what made it (and the marker storage.replace_dir checks before replacing).
META_FILE = "recsys_pretrain.json"


def corpus_uris(cfg: Config) -> dict[str, list[str]]:
    """The parquet files each source reads. Examples come from the TRAIN split only."""
    out: dict[str, list[str]] = {}
    for source in cfg.pretrain.sources:
        if source == "items":
            uri = paths.items(cfg)
        else:
            uri = paths.examples(cfg, "search" if source == "queries" else "next_item", "train")
        out[source] = storage.list_files(uri, cfg.storage, ".parquet")
    return out


class _HistoryTexts:
    """Ray Data map_batches: next-item rows -> the user tower's text of their history."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        from recsys.items import read_items

        cfg = config_from_dict(cfg_dict)
        table = read_items(paths.items(cfg), cfg.storage)
        self.text = dict(zip(table.column("item_id").to_pylist(), table.column("text").to_pylist(), strict=True))
        self.max_items = max(1, cfg.model.user_history_items)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from recsys.encoder import render_user_text

        texts = []
        for history in batch["history"]:
            # history is oldest first (EXAMPLES_SCHEMA); the user tower reads it newest first.
            # prepare refuses unknown items, so a missing one here is a broken items table.
            hist = [self.text[i] for i in reversed(list(history))]
            texts.append(render_user_text(None, hist, self.max_items))
        return {"text": np.array(texts, dtype=object)}


def build_corpus(cfg: Config) -> tuple[Any, dict[str, int]]:
    """(Ray dataset of one `text` column, rows per source), in a seeded order (`_seeded_order`)."""
    import ray.data

    fs, _ = storage.filesystem(cfg.storage.root, cfg.storage)
    parts, counts = [], {}
    for source, files in corpus_uris(cfg).items():
        if not files:
            if source == "items":
                raise FileNotFoundError(f"no items table under {paths.items(cfg)}: run the prepare job first (python -m jobs.prepare)")
            # A shop without search logs has no queries (Amazon), one without sessions no histories.
            log.warning("pretrain.sources has %r but the prepared data has no %s training examples: that source adds nothing",
                        source, "search" if source == "queries" else "next_item")
            counts[source] = 0
            continue
        ds = ray.data.read_parquet([storage.filesystem(f, cfg.storage)[1] for f in files], filesystem=fs)
        if source == "items":
            ds = ds.select_columns(["text"])
        elif source == "queries":
            # A query is one row per judged product in the examples: each distinct query once.
            ds = ds.select_columns(["query"]).filter(lambda r: bool(r["query"] and r["query"].strip()))
            ds = ds.groupby("query").count().select_columns(["query"]).rename_columns({"query": "text"})
        else:
            ds = ds.select_columns(["history"]).filter(lambda r: r["history"] is not None and len(r["history"]) > 0)
            ds = ds.map_batches(_HistoryTexts, fn_constructor_kwargs={"cfg_dict": to_dict(cfg)}, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
        ds = ds.materialize()
        counts[source] = ds.count()
        if counts[source] == 0:
            log.warning("pretrain source %r yields no text (files %s): it adds nothing", source, files[:3])
            continue
        parts.append(ds)
    if not parts:
        raise ValueError(f"pretrain.sources {cfg.pretrain.sources}: no text at all in the prepared data under {paths.data_dir(cfg)}")
    corpus = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return _seeded_order(corpus, cfg.pretrain.seed, sum(counts.values()), cfg.pretrain.num_workers), counts


def _text_keys(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    texts = batch["text"]
    keys = np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}\x00{t}".encode(), digest_size=8).digest(), "little") for t in texts),
                       dtype=np.uint64, count=len(texts))
    return {"text": texts, "_order": keys}


def _seeded_order(corpus: Any, seed: int, rows: int, workers: int) -> Any:
    """The corpus in an order that depends on the seed and the texts alone.

    random_shuffle(seed) is reproducible only over the same blocks in the same order, and the
    groupby (distinct queries) and the history actors hand blocks back in completion order. A
    sort by a seeded hash of the text is a uniform shuffle that ignores the blocks; the
    repartition then cuts it at fixed row counts, so the trainer's streaming split deals the
    same rows to the same rank in every run, and a resumed run skips exactly what it consumed.
    Equal texts tie, and they are the same row."""
    blocks = max(2 * workers, -(-rows // 20_000))
    return (corpus.map_batches(_text_keys, fn_kwargs={"seed": seed}, batch_format="numpy")
            .sort("_order").repartition(blocks, shuffle=False).drop_columns(["_order"]))


def _ds_config(cfg: Config, load_universal: bool = False) -> dict[str, Any]:
    """train's DeepSpeed config (ZeRO stage, precision, offload) at pretrain's batch size."""
    t = cfg.train.model_copy(update={"batch_size": cfg.pretrain.batch_size, "grad_accum": 1, "contrastive_batch": 0})
    return deepspeed_config(cfg.model_copy(update={"train": t}), load_universal)


def load_mlm(cfg: Config, dtype: torch.dtype | None = None) -> tuple[Any, list[str]]:
    """AutoModelForMaskedLM of model.name_or_path and the names of weights it had to initialise
    (an encoder saved without its MLM head, e.g. the sentence-transformers MiniLM)."""
    from transformers import AutoModelForMaskedLM

    from recsys.encoder import resolve_model_path

    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    model, info = AutoModelForMaskedLM.from_pretrained(resolve_model_path(cfg.model.name_or_path), output_loading_info=True, **kwargs)
    return model, sorted(info.get("missing_keys") or [])


class _Masker:
    """Tokenise a batch of texts and mask it (DataCollatorForLanguageModeling), reproducibly."""

    def __init__(self, tokenizer: Any, cfg: Config) -> None:
        from transformers import DataCollatorForLanguageModeling

        p = cfg.pretrain
        if p.whole_word_mask and not tokenizer.is_fast:
            raise ValueError("pretrain.whole_word_mask needs a fast tokenizer (word offsets); this model's is not")
        self.tokenizer, self.cfg = tokenizer, cfg
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=p.mlm_probability,
                                                        whole_word_mask=p.whole_word_mask)

    def __call__(self, texts: list[str], seed: int) -> dict[str, torch.Tensor]:
        wwm = self.cfg.pretrain.whole_word_mask
        enc = self.tokenizer(texts, truncation=True, max_length=self.cfg.pretrain.max_tokens, padding="longest",
                             return_special_tokens_mask=True, return_offsets_mapping=wwm, return_tensors="pt")
        # A generator per (step, rank): the same masks in a resumed run as in an uninterrupted one.
        self.collator.generator = torch.Generator().manual_seed(seed)
        ids, labels = self.collator.torch_mask_tokens(
            enc["input_ids"], special_tokens_mask=enc["special_tokens_mask"], offset_mapping=enc.get("offset_mapping") if wwm else None,
        )
        return {"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels}


def _metrics_uri(cfg: Config) -> str:
    return storage.join(paths.pretrain_dir(cfg), "metrics.jsonl")


def read_metrics(cfg: Config) -> list[dict[str, Any]]:
    return _read_metrics(cfg, _metrics_uri(cfg))


def _export(engine: Any, module: Any, tokenizer: Any, cfg: Config, rank: int, meta: dict[str, Any]) -> str:
    """The base encoder without its MLM head (+ tokenizer) to paths.pretrained(cfg), from rank 0
    (ZeRO-3 shards gathered first; every rank must call it)."""
    import deepspeed

    out = paths.pretrained(cfg)
    params = list(module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.train.zero_stage == 3 else contextlib.nullcontext()
    with ctx:
        if rank == 0:
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
            fresh, _ = load_mlm(cfg, dtype=torch.float32)
            fresh.load_state_dict(state)
            with tempfile.TemporaryDirectory(prefix="recsys-pretrained-") as tmp:
                fresh.base_model.save_pretrained(tmp)  # BertModel etc.: no MLM head, no pooler
                tokenizer.save_pretrained(tmp)
                Path(tmp, META_FILE).write_text(json.dumps(meta, indent=2, default=str))
                Path(tmp, "config.yaml").write_text(to_yaml(cfg))
                storage.replace_dir(tmp, out, cfg.storage, marker=META_FILE)
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from recsys.model import load_tokenizer
    from recsys.runtime import print_progress

    cfg = config_from_dict(config["cfg"])
    p = cfg.pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        print_progress(log)
    torch.manual_seed(p.seed)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.mask_token is None:
        raise ValueError(f"model.name_or_path={cfg.model.name_or_path}: its tokenizer has no mask token, so it cannot be pretrained as a masked LM")
    model, initialised = load_mlm(cfg)
    if rank == 0:
        if initialised:
            log.warning("%s has no masked-LM head: %d weights newly initialised (%s%s); the head is learnt from scratch "
                        "and dropped from the output", cfg.model.name_or_path, len(initialised), ", ".join(initialised[:4]),
                        ", ..." if len(initialised) > 4 else "")
        else:
            log.info("%s: masked-LM head loaded from the checkpoint", cfg.model.name_or_path)
    model.train()  # from_pretrained returns eval mode (dropout off)
    optimizer = torch.optim.AdamW(param_groups(model, p.weight_decay), lr=p.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(p.warmup, p.steps))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # an inference-only op built at every start
    universal = resume_layout(STATE_FILE, world, p.batch_size, 1, cfg.train.zero_stage, rank, "pretrain.batch_size")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=_ds_config(cfg, universal))

    rows: list[dict[str, Any]] = []
    resume: tuple[int, dict[int, Any]] = (0, {})
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            load_engine_checkpoint(engine, d, universal)
            resume = load_consumed(d)
        if rank == 0:
            rows = [r for r in read_metrics(cfg) if r["step"] <= engine.global_steps]
            log.info("pretrain resumed from checkpoint at step %d", engine.global_steps)
    step = start = engine.global_steps
    masker = _Masker(tokenizer, cfg)
    stream = Stream(ray.train.get_dataset_shard("train"), p.batch_size, p.seed, rank, resume=resume, owner=rank == 0,
                    too_small=f"pretrain worker {rank} got no full batch of {p.batch_size} texts: the corpus is too small for "
                              f"{world} workers; lower pretrain.batch_size or pretrain.num_workers")
    batches = iter(stream)
    losses: list[float] = []
    tokens = masked = 0
    seen = hashlib.blake2b(digest_size=8)
    tokens_total = rows[-1]["tokens_total"] if rows else 0
    t_last, wait = time.perf_counter(), 0.0
    summary: dict[str, Any] = {}
    while step < p.steps:
        t_fetch = time.perf_counter()
        texts = [str(t) for t in next(batches)[1]["text"]]
        batch = {k: v.to(engine.device) for k, v in masker(texts, seed=p.seed + 1_000_003 * step + rank).items()}
        wait += time.perf_counter() - t_fetch
        seen.update("\x00".join(texts).encode())
        # Dropout's stream per (step, rank), as the masks': a resumed run draws what an
        # uninterrupted one draws at the same step (DeepSpeed's checkpoint holds no RNG state).
        torch.manual_seed(p.seed + 1_000_003 * step + rank + 7_919)  # not the masks' seed: independent streams
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        step = engine.global_steps
        losses.append(float(loss.detach()))
        # Padded tokens: what the step computed over (the attention mask's padding costs too).
        tokens += int(batch["input_ids"].numel())
        masked += int((batch["labels"] != -100).sum())
        checkpoint_now = step % p.checkpoint_every == 0 or step == p.steps
        if not (step % p.log_every == 0 or checkpoint_now):
            continue
        now = time.perf_counter()
        t = torch.tensor([tokens, masked], dtype=torch.float64, device=engine.device)
        if world > 1:
            torch.distributed.all_reduce(t)
        tokens_total += int(t[0])
        row = {
            "step": step, "loss": _global_mean(float(np.mean(losses)), world, engine.device), "lr": float(engine.get_lr()[0]),
            "tokens": int(t[0]), "masked_tokens": int(t[1]), "tokens_total": tokens_total,
            "step_s": (now - t_last) / max(1, len(losses)), "data_wait_s": wait, "start_step": start, "skipped_rows": stream.skipped_rows,
            # Every rank's texts since the last row: equal in a resumed and an uninterrupted run.
            "batch_hash": _all_ranks_digest(seen.digest(), engine.device),
        }
        losses, tokens, masked, t_last, wait = [], 0, 0, now, 0.0
        seen = hashlib.blake2b(digest_size=8)
        if rank == 0:
            rows.append(row)
            _write_metrics(cfg, rows, _metrics_uri(cfg))
            log.info("pretrain step %d/%d MLM loss %.4f lr %.2e %.2fs/step", step, p.steps, row["loss"], row["lr"], row["step_s"])
        if checkpoint_now:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag=DS_TAG)
                stream.save(tmp)
                # `world`: a resume with another worker count knows to re-cut ZeRO's partitions.
                Path(tmp, STATE_FILE).write_text(json.dumps({"step": step, "world": world, "examples_per_step": world * p.batch_size}))
                if rank == 0:
                    Path(tmp, "config.yaml").write_text(to_yaml(cfg))
                ray.train.report(row, checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_upload_fn=checkpoint_upload(cfg))
        else:
            ray.train.report(row)
        summary = row
    batches.close()
    all_rows = rows if rank == 0 else []
    meta = {
        "base_model": cfg.model.name_or_path, "steps": step, "mlm_probability": p.mlm_probability,
        "whole_word_mask": p.whole_word_mask, "max_tokens": p.max_tokens, "sources": p.sources,
        "initialised_head_weights": initialised, "first_loss": all_rows[0]["loss"] if all_rows else None,
        "final_loss": all_rows[-1]["loss"] if all_rows else None, "config": redacted(cfg),
    }
    out = _export(engine, engine.module, tokenizer, cfg, rank, meta)
    if rank == 0:
        log.info("adapted encoder (no MLM head) written to %s", out)
    ray.train.report({**summary, "step": step, "output": out})


def run(cfg: Config) -> dict[str, Any]:
    """Pretrain on the prepared data; returns the losses, steps, tokens and the output path."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from recsys.runtime import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(cfg=cfg)
    corpus, counts = build_corpus(cfg)
    log.info("pretrain corpus: %s texts (%s)", sum(counts.values()), counts)
    train_fs, storage_path = storage.train_filesystem(cfg.storage.root, cfg.storage)
    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ScalingConfig(
            num_workers=cfg.pretrain.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.worker_resources},
        ),
        datasets={"train": corpus},
        # Deterministic split: a resumed attempt sees the same stream and skips what was consumed.
        dataset_config=DataConfig(execution_options=_ingest_options()),
        run_config=RunConfig(
            name=cfg.pretrain.run_name, storage_path=storage_path, storage_filesystem=train_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.pretrain.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.pretrain.max_failures),
        ),
    )
    result = fit_trainer(trainer)
    if result.error:
        raise result.error
    rows = read_metrics(cfg)
    summary = {
        "steps": rows[-1]["step"] if rows else None,
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "tokens_total": rows[-1]["tokens_total"] if rows else None,
        "resumed_from_step": rows[-1]["start_step"] if rows else None,
        "corpus": counts,
        "output": paths.pretrained(cfg),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    log.info("pretraining finished: %s", summary)
    return summary
