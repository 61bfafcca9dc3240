"""End-to-end training of the sequence user tower: the item tower's text encoder fine-tuned
jointly with the tower (`sequence.joint_steps` > 0), as a stage after the frozen one.

One step: the batch's own items (its targets, then its history items newest first, at most
`sequence.joint_grad_items`) are encoded by the text encoder with gradient, but the forward pass
reads every catalog item's text embedding from a cache that the current encoder refreshes every
`sequence.joint_refresh_every` steps, the batch's fresh encodings passing their gradient straight
through (so the model cannot tell fresh items from cached ones). The loss is the frozen stage's full
softmax over the catalog (`losses.full_softmax_loss`, the same masks), so the gradient reaches
the encoder through the batch's rows and the tower through everything. At every refresh the
validation users are ranked over the refreshed catalog; the best validation's encoder and tower
are kept, and the frozen stage's result is the one to beat (a joint stage that never improves
on it changes nothing).

Items stay what serving sees: L2-normalised text embeddings of `item_prefix + text`, truncated to
`model.max_item_tokens`, pooled as the export's sentence-transformers folder pools them.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.config import SequenceConfig
from recsys.features import ItemTokens, pad_tokens
from recsys.losses import full_softmax_loss
from recsys.sequence import SequenceModel, SequenceTower

log = logging.getLogger(__name__)

PAD = -1
PROGRESS_EVERY = 10  # steps between progress lines


def check_joint(cfg: Any, catalog_items: int) -> None:
    """Refuse, naming the keys, what the joint stage cannot train correctly."""
    s, m = cfg.sequence, cfg.model
    if not s.joint_steps:
        return
    if cfg.train.task != "next_item":
        # The item tower is also search's (one encoder): fine-tuning it for next-item alone would
        # leave search's query tower matching items it no longer embeds.
        raise ValueError(f"sequence.joint_steps={s.joint_steps} fine-tunes the item tower for next-item only; "
                         f"train.task is {cfg.train.task!r}: set train.task=next_item or sequence.joint_steps=0")
    if s.item_tower != "base":
        # The text stage's export would be overwritten by the joint encoder, and a re-run would
        # start the joint stage again from that, drifting further each time.
        raise ValueError("sequence.joint_steps > 0 starts from the pretrained item tower: set sequence.item_tower=base")
    if m.separate_towers or m.projection_dim:
        raise ValueError("sequence.joint_steps > 0 needs one shared encoder without projection "
                         "(model.separate_towers=false, model.projection_dim=0)")
    if catalog_items > s.full_softmax_max_items:
        raise ValueError(f"sequence.joint_steps > 0 needs the full softmax: the catalog has {catalog_items} items, "
                         f"above sequence.full_softmax_max_items={s.full_softmax_max_items}")


def grad_rows(target: torch.Tensor, hist: torch.Tensor, cap: int) -> torch.Tensor:
    """The catalog rows a step encodes with gradient, sorted: every target (batch,), then history
    items (batch, L; newest first, PAD after) by recency across the batch, up to `cap` rows in all.

    Without a cap a batch of long histories (length bucketing puts them together) encodes
    batch x max_len items with gradient: 1,632 at 32 x 51, enough activations to run a 24 GB
    machine out of memory with MiniLM. Items past the cap take their cached embedding."""
    order = torch.cat([target, hist.T.reshape(-1)]).numpy()  # targets, then column by column: newest first
    order = order[order != PAD]
    _, first = np.unique(order, return_index=True)
    keep = order[np.sort(first)]  # distinct rows in priority order
    n_targets = len(np.unique(target.numpy()))
    return torch.from_numpy(np.sort(keep[: max(cap, n_targets)]))


class JointStep(nn.Module):
    """The text encoder and the sequence tower in one module, so DDP syncs both."""

    def __init__(self, encoder: nn.Module, tower: SequenceTower) -> None:
        super().__init__()
        self.encoder = encoder  # a recsys.model.TwoTower: its encode_item is the item tower
        self.tower = tower

    def forward(
        self, cache: torch.Tensor, cat_ids: torch.Tensor, hist: torch.Tensor,
        tok_ids: torch.Tensor, tok_mask: torch.Tensor, rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fresh = self.encoder.encode_item(tok_ids, tok_mask).to(cache.dtype)  # (rows, text_dim), with gradient
        # Forward with the cached values everywhere, gradient through the fresh encodings
        # (straight-through). With the fresh values in the forward pass the model learnt to tell
        # the batch's freshly encoded items from the stale cache: on Amazon the training loss fell
        # (5.7 -> 4.1 in 80 steps) while validation NDCG@10 fell from 0.0684 to 0.0388, and the
        # loss jumped back at each refresh.
        cat = cache.index_copy(0, rows, cache[rows] + fresh - fresh.detach())  # (catalog, text_dim)
        return self.tower(cat, cat_ids, hist)  # (batch, dim), (catalog, dim)


@torch.no_grad()
def embed_all(encoder: nn.Module, tokens: ItemTokens, batch_size: int = 128) -> torch.Tensor:
    """(catalog, text_dim) embeddings of every item by the current encoder (eval mode)."""
    was = encoder.training
    encoder.eval()
    n = len(tokens)
    # Once: rows past the cache's budget are not tokenised a second time for their batch.
    ids = tokens.ids_for(range(n))
    order = np.argsort([len(t) for t in ids], kind="stable")  # similar lengths pad less
    out = torch.empty(0)
    for s in range(0, n, batch_size):
        rows = order[s : s + batch_size].tolist()
        emb = encoder.encode_item(*pad_tokens([ids[r] for r in rows], tokens.pad_id, tokens.padding_side))  # (b, text_dim)
        if out.numel() == 0:
            out = torch.empty((n, emb.shape[1]), dtype=torch.float32)
        out[rows] = emb.float()
    encoder.train(was)
    return out


def fit_joint(
    scfg: SequenceConfig, model: SequenceModel, encoder: nn.Module, tokens: ItemTokens, item_ids: Sequence[str],
    dup: np.ndarray, valid: Any, batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    wrap: Callable[[nn.Module], nn.Module] | None = None, baseline: float = float("-inf"),
    on_eval: Callable[[dict[str, Any], dict[str, Any]], None] | None = None, exclude_history: bool = False,
    state: dict[str, Any] | None = None,
) -> tuple[SequenceModel, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """`sequence.joint_steps` steps from the frozen stage's `model` and the item tower `encoder`.

    Returns the best model, the best encoder's state dict (None when no validation beat
    `baseline`, the frozen stage's valid NDCG@10) and the history. `batches(epoch)` yields
    `sequence.joint_batch_size` batches; `on_eval(row, state)` after every validation (the Ray
    job checkpoints `state`, which `state=` resumes)."""
    from recsys.train_sequence import validate

    tower = model.tower
    joint = JointStep(encoder, tower)
    view = wrap(joint) if wrap else joint
    opt = torch.optim.AdamW([
        {"params": list(tower.parameters()), "lr": scfg.lr},
        {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": scfg.joint_lr},
    ], weight_decay=scfg.weight_decay)
    cat_ids = model.id_rows(item_ids)  # (catalog,)
    dup_t = torch.from_numpy(np.asarray(dup, dtype=np.int64))
    hist_out: dict[str, Any] = {"rows": [], "best": baseline, "best_step": 0, "steps": 0,
                                "params": sum(p.numel() for p in joint.parameters() if p.requires_grad)}
    best_tower, best_encoder = copy.deepcopy(tower.state_dict()), None
    # What is kept when nothing beats the baseline: the encoder as given (on resume too, before
    # the checkpoint's state is loaded), so checkpoints need not carry it.
    start_encoder = copy.deepcopy(encoder.state_dict())
    step, epoch = 0, 0
    if state:
        joint.load_state_dict(state["joint"])
        opt.load_state_dict(state["opt"])
        for group, lr in zip(opt.param_groups, (scfg.lr, scfg.joint_lr), strict=True):
            group["lr"] = lr  # the config's, not the checkpoint's
        hist_out, step, epoch = state["history"], int(state["step"]), int(state["epoch"])
        best_tower, best_encoder = state["best_tower"], state["best_encoder"]
    cache = embed_all(encoder, tokens)
    t_last = time.perf_counter()
    while step < scfg.joint_steps:
        losses, got_batch = [], False
        for b in batches(epoch):
            got_batch = True
            joint.train()
            hist, target = b["hist"], b["target"]  # (batch, L), (batch,)
            hist = hist[:, : max(1, int((hist != PAD).sum(1).max()))]
            rows = grad_rows(target, hist, scfg.joint_grad_items)  # the batch's own items, bounded
            u, items = view(cache, cat_ids, hist, *tokens.batch(rows.tolist()), rows)
            loss = full_softmax_loss(u, items, target, scfg.temperature, masked=hist if scfg.mask_history else None,
                                     dup_rows=dup_t, weights=b.get("weight"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % PROGRESS_EVERY == 0:  # steps are seconds each on CPU: show the pace between validations
                log.info("joint step %d/%d: loss %.4f, %.2f s/step", step, scfg.joint_steps, float(np.mean(losses[-PROGRESS_EVERY:])),
                         (time.perf_counter() - t_last) / len(losses))
            if step % scfg.joint_refresh_every == 0 or step == scfg.joint_steps:
                cache = embed_all(encoder, tokens)
                m = validate(SequenceModel(tower, model.id_of), valid, cache.numpy(), item_ids, exclude_history)
                score = m["valid/ndcg@10"]
                improved = score > hist_out["best"]
                if improved:
                    hist_out["best"], hist_out["best_step"] = score, step
                    best_tower, best_encoder = copy.deepcopy(tower.state_dict()), copy.deepcopy(encoder.state_dict())
                row = {"joint_step": step, "loss": float(np.mean(losses)), **m, "improved": improved,
                       "interval_s": round(time.perf_counter() - t_last, 1)}
                losses, t_last = [], time.perf_counter()
                hist_out["rows"].append(row)
                hist_out["steps"] = step
                log.info("joint step %d/%d: loss %.4f, valid NDCG@10 %.4f (best %.4f at step %d, frozen %.4f)", step,
                         scfg.joint_steps, row["loss"], score, hist_out["best"], hist_out["best_step"], baseline)
                if on_eval:
                    on_eval(row, {"joint": joint.state_dict(), "opt": opt.state_dict(), "history": hist_out, "step": step,
                                  "epoch": epoch, "best_tower": best_tower, "best_encoder": best_encoder})
            if step >= scfg.joint_steps:
                break
        if not got_batch:
            raise ValueError(f"the joint stage got no batch of next-item examples in epoch {epoch} (too few for the workers?)")
        epoch += 1
    tower.load_state_dict(best_tower)
    encoder.load_state_dict(best_encoder if best_encoder is not None else start_encoder)
    return SequenceModel(tower, model.id_of), best_encoder, hist_out
