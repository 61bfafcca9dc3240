"""Validation while training: every `train.eval_every` steps the towers being trained rank the
whole catalog for the validation split's queries (a fixed sample of them when
`train.eval_queries` is set), as `recsys.evaluate` ranks the test split, and the training loop
keeps the export of the best evaluation (sentence-transformers users get the same from their
evaluators).

Every rank encodes an equal share of the catalog and of the queries and the shares are gathered,
so all ranks hold the same embeddings and compute the same metrics (under ZeRO-3 every rank
must take part in each forward pass anyway). Rankings are exact inner products over the catalog
(`recsys.retrieval.search`), the metrics `recsys.metrics`'.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from recsys import paths, retrieval
from recsys.config import Config
from recsys.encoder import render_user_text
from recsys.metrics import average, per_query_metrics

log = logging.getLogger(__name__)


def kinds(cfg: Config) -> tuple[str, ...]:
    return ("next_item", "search") if cfg.train.task == "both" else (cfg.train.task,)


def headline(cfg: Config, scores: dict[str, float]) -> float:
    """The number `train.eval_metric` names: its mean over the validated tasks."""
    values = [scores[f"valid/{k}/{cfg.train.eval_metric}"] for k in kinds(cfg) if f"valid/{k}/{cfg.train.eval_metric}" in scores]
    return float(np.mean(values)) if values else float("nan")


class Validator:
    """The validation queries and catalog texts, read once; `score(towers)` ranks them."""

    def __init__(self, cfg: Config, item_ids: list[str], item_texts: list[str], rank: int, world: int, batch_size: int = 64) -> None:
        from recsys.evaluate import _read_dir, build_queries

        self.cfg, self.rank, self.world, self.batch_size = cfg, rank, world, batch_size
        m = cfg.model
        self.item_ids = item_ids
        self.item_texts = [m.item_prefix + t for t in item_texts]
        text_of = dict(zip(item_ids, item_texts, strict=True))
        k = int(cfg.train.eval_metric.split("@")[1])
        self.ks = sorted({k, 10})
        self.tasks: dict[str, tuple[list[str], list[dict[str, float]], list[set[str]] | None]] = {}
        for kind in kinds(cfg):
            ex = _read_dir(paths.examples(cfg, kind, "valid"), cfg)
            if ex is None or ex.num_rows == 0:
                continue
            queries = build_queries(ex, kind)
            if cfg.train.eval_queries and len(queries) > cfg.train.eval_queries:
                # A fixed sample (the same at every evaluation, on every rank, after a resume).
                keep = np.sort(np.random.default_rng(cfg.train.seed).choice(len(queries), cfg.train.eval_queries, replace=False))
                queries = [queries[i] for i in keep]
            texts = [m.query_prefix + render_user_text(q["query"], [text_of[h] for h in q["history"] if h in text_of], m.user_history_items)
                     for q in queries]
            exclude = [set(q["history"]) for q in queries] if cfg.eval.exclude_history else None
            self.tasks[kind] = (texts, [q["relevant"] for q in queries], exclude)
        if not self.tasks:
            raise ValueError(f"train.eval_every={cfg.train.eval_every}: no validation examples under {paths.examples(cfg, kinds(cfg)[0], 'valid')}")

    def _encode(self, encode: Any, tokenizer: Any, texts: list[str], max_tokens: int, device: Any) -> np.ndarray:
        """Embeddings of `texts` (all of them, on every rank): each rank encodes one equal share."""
        share = -(-len(texts) // self.world)
        mine = texts[self.rank * share:(self.rank + 1) * share]
        mine = mine + [""] * (share - len(mine))  # equal shares: the same number of forward passes everywhere
        parts = []
        for s in range(0, share, self.batch_size):
            tok = tokenizer(mine[s:s + self.batch_size], truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
            parts.append(encode(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float())
        local = torch.cat(parts)  # (share, dim)
        if self.world > 1:
            gathered = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(gathered, local.contiguous())
            local = torch.cat(gathered)
        return local[: len(texts)].cpu().numpy()

    @torch.no_grad()
    def score(self, towers: torch.nn.Module, tokenizer: Any, device: Any) -> dict[str, float]:
        """`valid/<task>/<metric>@<k>` for the towers as they are now (each module left in its mode)."""
        m = self.cfg.model
        # Every submodule's own mode back afterwards, not towers.train(): that would switch on
        # dropout that training keeps off (train.dropout=false).
        modes = [(mod, mod.training) for mod in towers.modules()]
        towers.eval()
        try:
            item_emb = self._encode(towers.encode_item, tokenizer, self.item_texts, m.max_item_tokens, device)  # (items, dim)
            pos = {i: n for n, i in enumerate(self.item_ids)}
            out: dict[str, float] = {}
            for kind, (texts, relevant, exclude) in self.tasks.items():
                q_emb = self._encode(towers.encode_query, tokenizer, texts, m.max_query_tokens, device)  # (queries, dim)
                ex_rows = [[pos[i] for i in e if i in pos] for e in exclude] if exclude else None
                ranked = [[self.item_ids[j] for j in top] for top, _ in retrieval.search(item_emb, q_emb, max(self.ks), None, ex_rows)]
                out.update(average(per_query_metrics(ranked, relevant, self.ks), f"valid/{kind}"))
        finally:
            for mod, mode in modes:
                mod.training = mode
        return out
