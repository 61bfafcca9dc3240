"""In-batch sampled softmax for two towers: a pure function of embeddings.

Gradient convention (what the 2-worker vs 1-worker test checks): each rank's candidates are the
items of the GLOBAL batch, gathered with an autograd-aware all_gather, and its loss is its share
of the global (weighted) mean: sum over LOCAL rows of w * loss, divided by the GLOBAL weight sum
and multiplied by the world size. The all_gather backward sums every rank's gradient into the
local item embeddings, and DeepSpeed/DDP then average parameter gradients over ranks, so the
update equals that of one worker computing the weighted mean loss over the whole global batch,
whatever the weights on each rank (a local normaliser would weight a rank of light rows as much
as a rank of purchases).

Logits, the logQ shift and the softmax are computed in fp32 whatever the towers' dtype: in bf16
a logit near 30 (cosine / 0.05 - log Q) has a resolution of 0.125, coarser than the differences
the loss has to learn from.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_MASK_VALUE = -1e4  # finite so bf16 logits never produce NaN through -inf - -inf


def item_key(item_id: str) -> int:
    """Stable non-negative 63-bit key for an item id (the same in every process and run)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little") >> 1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def _gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def sampled_softmax_loss(
    q: torch.Tensor,  # (batch, dim) query/user embeddings
    d: torch.Tensor,  # (batch, dim) positive item embeddings, row-aligned with q
    *,
    temperature: float | torch.Tensor,
    weights: torch.Tensor | None = None,  # (batch,) example weights (event strength)
    item_keys: torch.Tensor | None = None,  # (batch,) int64 key of each positive item
    dup_keys: torch.Tensor | None = None,  # (batch,) int64 duplicate group of each positive
    history_keys: torch.Tensor | None = None,  # (batch, H) int64 item keys in the row's history, -1 pad
    group_keys: torch.Tensor | None = None,  # (batch,) int64 user (next-item) / query (search) of each row
    logq: torch.Tensor | None = None,  # (batch,) log sampling probability of each positive item
    hard_negatives: torch.Tensor | None = None,  # (batch, n, dim) extra negatives per row
    hard_logq: torch.Tensor | None = None,  # (batch, n) log Q of each hard negative; needed with logq
    hard_keys: torch.Tensor | None = None,  # (batch, n) int64 item key of each hard negative
    hard_dup_keys: torch.Tensor | None = None,  # (batch, n) int64 duplicate group of each hard negative
    memory: Memory | None = None,  # earlier steps' items: more negatives (cross-batch memory)
    gather: bool = True,
) -> torch.Tensor:
    """Softmax over the global batch's items; accidental hits masked; logQ-corrected.

    Accidental hits never count as negatives of a row: its own item (wherever it sits in the
    batch), items of its duplicate group, its history, and the positives of other rows of the
    same group (`group_keys`: the same user's other next items, the same query's other relevant
    products). `memory` items are extra negatives under the same masks and logQ correction.
    Hard negatives were mined without the row's own item, duplicates and history; with
    `hard_keys` they are also masked where they are a positive of another row of the same group
    anywhere in the global batch (the miner saw another set of rows: this rank's batch, or a
    Ray Data block under train.tokenize_in=pipeline)."""
    rank, world = _world()
    b = q.shape[0]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.float()  # a learnt one lives in the engine's dtype (bf16)
    distributed = gather and world > 1
    if distributed:
        d_all = _gather_with_grad(d)  # (world * batch, dim)
        gather_keys = _gather_no_grad
        offset = rank * b
    else:
        d_all = d
        gather_keys = lambda t: t  # noqa: E731
        offset = 0
    logits = q.float() @ d_all.float().T / temperature  # (batch, N), fp32
    if logq is not None:
        # Popular items are sampled as negatives more often; subtracting log Q(item) removes
        # that bias from the sampled softmax (Yi et al., 2019).
        logits = logits - gather_keys(logq.float())[None, :]
    labels = torch.arange(b, device=q.device) + offset  # (batch,)
    mask = torch.zeros_like(logits, dtype=torch.bool)  # (batch, N) True = not a negative
    # Gathered once: the in-batch masks and the hard negatives' read them.
    keys_all = gather_keys(item_keys) if item_keys is not None else None  # (N,)
    dups_all = gather_keys(dup_keys) if dup_keys is not None else None  # (N,)
    groups_all = gather_keys(group_keys) if group_keys is not None else None  # (N,)
    if item_keys is not None:
        mask |= item_keys[:, None] == keys_all[None, :]
        if history_keys is not None and history_keys.numel():
            in_hist = (history_keys[:, :, None] == keys_all[None, None, :]) & (history_keys[:, :, None] >= 0)
            mask |= in_hist.any(dim=1)
    if dup_keys is not None:
        mask |= dup_keys[:, None] == dups_all[None, :]
    if group_keys is not None:
        mask |= group_keys[:, None] == groups_all[None, :]
    mask[torch.arange(b, device=q.device), labels] = False
    logits = logits.masked_fill(mask, _MASK_VALUE)
    if memory is not None and len(memory):
        ml = q.float() @ memory.emb.float().T / temperature  # (batch, M)
        if logq is not None:
            ml = ml - memory.logq[None, :]
        # A memory item is the same product, a duplicate, a history item or another answer of
        # the row's query / user exactly as an in-batch item would be: never a negative then.
        mmask = item_keys[:, None] == memory.item_keys[None, :] if item_keys is not None else torch.zeros_like(ml, dtype=torch.bool)
        if item_keys is not None and history_keys is not None and history_keys.numel():
            # Row by row: a (batch, history, M) comparison would take GBs for a large memory.
            for r in range(b):
                hist = history_keys[r][history_keys[r] >= 0]
                if hist.numel():
                    mmask[r] |= torch.isin(memory.item_keys, hist)
        if dup_keys is not None:
            mmask |= dup_keys[:, None] == memory.dup_keys[None, :]
        if group_keys is not None:
            mmask |= group_keys[:, None] == memory.group_keys[None, :]
        logits = torch.cat([logits, ml.masked_fill(mmask, _MASK_VALUE)], dim=1)
    if hard_negatives is not None:
        hn = torch.einsum("bd,bnd->bn", q.float(), hard_negatives.float()) / temperature  # (batch, n)
        if logq is not None:
            # Every other logit was shifted by -log Q (about +11 for a 50k-item catalog); an
            # uncorrected hard negative would sit e^11 below them and carry no gradient.
            if hard_logq is None:
                raise ValueError("sampled_softmax_loss: hard_negatives with logq need hard_logq (batch, n)")
            hn = hn - hard_logq.float()
        if hard_keys is not None and item_keys is not None and group_keys is not None:
            same = group_keys[:, None] == groups_all[None, :]  # (batch, N)
            hmask = torch.zeros_like(hn, dtype=torch.bool)  # (batch, n)
            for j in range(hn.shape[1]):  # column by column: no (batch, n, N) tensor
                hit = hard_keys[:, j, None] == keys_all[None, :]  # (batch, N)
                if dups_all is not None and hard_dup_keys is not None:
                    hit |= hard_dup_keys[:, j, None] == dups_all[None, :]
                hmask[:, j] = (hit & same).any(dim=1)
            hn = hn.masked_fill(hmask, _MASK_VALUE)
        logits = torch.cat([logits, hn], dim=1)
    per_row = F.cross_entropy(logits, labels, reduction="none")  # (batch,)
    w = torch.ones_like(per_row) if weights is None else weights.to(per_row.dtype)  # (batch,)
    total = w.sum()
    if world > 1:
        # The global weight sum (weights carry no gradient): each rank's share of the global mean,
        # also without gathered negatives (DeepSpeed/DDP still average the ranks' gradients).
        total = total.detach().clone()
        dist.all_reduce(total)
        total = total / world
    return (per_row * w).sum() / total.clamp(min=1e-12)


class Memory:
    """Cross-batch memory (Wang et al., 2020, XBM): the item embeddings of the last `size`
    positives of the global batch, detached, with what masking and logQ need. Each step adds
    thousands of negatives for one matrix product. The embeddings come from the encoder of the
    step that made them, at most size / global batch steps old; with a small learning rate they
    drift slowly (XBM starts using them after the first, fast-moving steps:
    `train.memory_start_step`). Every rank holds the same
    memory (it stores the gathered batch). It is not checkpointed: a resumed run refills it."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        self.size = size
        self.emb = torch.zeros(0, 0)  # (M, dim)
        self.item_keys = self.dup_keys = self.group_keys = torch.zeros(0, dtype=torch.int64)  # (M,)
        self.logq = torch.zeros(0)  # (M,)

    def __len__(self) -> int:
        return self.emb.shape[0]

    def add(self, d: torch.Tensor, item_keys: torch.Tensor, dup_keys: torch.Tensor, group_keys: torch.Tensor, logq: torch.Tensor) -> None:
        """Append this step's positives (local rows: gathered here across ranks), newest last."""
        _, world = _world()
        parts = [d.detach().float(), item_keys, dup_keys, group_keys, logq.float()]
        if world > 1:
            parts = [_gather_no_grad(x) for x in parts]
        if not len(self):
            self.emb = parts[0][:0]
            self.item_keys, self.dup_keys, self.group_keys, self.logq = (x[:0] for x in parts[1:])
        cut = lambda old, new: torch.cat([old, new])[-self.size:]  # noqa: E731
        self.emb, self.item_keys, self.dup_keys = cut(self.emb, parts[0]), cut(self.item_keys, parts[1]), cut(self.dup_keys, parts[2])
        self.group_keys, self.logq = cut(self.group_keys, parts[3]), cut(self.logq, parts[4])


class Temperature(nn.Module):
    """The softmax temperature: learnt (log-parameterised) or fixed.

    A module of its own so that ZeRO-3 fetches its parameter wherever it is read (the module's
    forward hook), also outside the loss's forward: the gradient cache reads it between engine
    calls and the training log reads it after the step. Shape (1,), not 0-d: DeepSpeed's initial
    broadcast views every parameter as bytes, which a 0-d tensor refuses ("self.dim() cannot be
    0"), so a learnt 0-d temperature failed every engine start."""

    def __init__(self, value: float, learn: bool) -> None:
        super().__init__()
        log_t = torch.tensor([float(value)]).log()
        if learn:
            self.log_value = nn.Parameter(log_t)
        else:
            self.register_buffer("log_value", log_t)

    @property
    def learnt(self) -> bool:
        return isinstance(self.log_value, nn.Parameter) and self.log_value.requires_grad

    def forward(self) -> torch.Tensor:
        return self.log_value.float().exp().clamp(min=1e-3, max=1.0).squeeze(0)  # ()


def _old_temperature_key(state: dict, prefix: str, *_: object) -> None:
    """Checkpoints from before 2026-12-02 hold the temperature as a 0-d `log_temperature`: read
    it as `tau.log_value` (shape (1,)), so such a run still resumes."""
    old = state.pop(prefix + "log_temperature", None)
    if old is not None:
        state[prefix + "tau.log_value"] = old.reshape(1)


class SampledSoftmaxLoss(nn.Module):
    """The loss with its settings and its temperature (recsys.losses.Temperature)."""

    def __init__(
        self,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        gather: bool = True,
        logq_correction: bool = True,
        mask_history: bool = True,
        mask_duplicates: bool = True,
        mask_same_group: bool = True,
    ) -> None:
        super().__init__()
        self.tau = Temperature(temperature, learn_temperature)
        self._register_load_state_dict_pre_hook(_old_temperature_key)
        self.gather = gather
        self.logq_correction = logq_correction
        self.mask_history = mask_history
        self.mask_duplicates = mask_duplicates
        self.mask_same_group = mask_same_group

    @property
    def temperature(self) -> torch.Tensor:
        return self.tau()  # ()

    def forward(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        weights: torch.Tensor | None = None,
        item_keys: torch.Tensor | None = None,
        dup_keys: torch.Tensor | None = None,
        history_keys: torch.Tensor | None = None,
        logq: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
        hard_logq: torch.Tensor | None = None,
        group_keys: torch.Tensor | None = None,
        memory: Memory | None = None,
        temperature: torch.Tensor | None = None,
        hard_keys: torch.Tensor | None = None,
        hard_dup_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`temperature`: a stand-in for the module's own (the gradient cache passes a detached
        copy to take the loss's gradient w.r.t. it without touching the parameter)."""
        return sampled_softmax_loss(
            q,
            d,
            temperature=self.temperature if temperature is None else temperature,
            weights=weights,
            item_keys=item_keys,
            dup_keys=dup_keys if self.mask_duplicates else None,
            history_keys=history_keys if self.mask_history else None,
            group_keys=group_keys if self.mask_same_group else None,
            logq=logq if self.logq_correction else None,
            hard_negatives=hard_negatives,
            hard_logq=hard_logq,
            hard_keys=hard_keys,
            hard_dup_keys=hard_dup_keys if self.mask_duplicates else None,
            memory=memory,
            gather=self.gather,
        )


def full_softmax_loss(
    u: torch.Tensor,  # (batch, dim) user embeddings
    items: torch.Tensor,  # (catalog, dim) every catalog item's embedding
    targets: torch.Tensor,  # (batch,) int64 catalog row of each row's next item
    temperature: float | torch.Tensor,
    masked: torch.Tensor | None = None,  # (batch, M) int64 catalog rows that are not negatives, -1 pad
    dup_rows: torch.Tensor | None = None,  # (catalog,) int64 duplicate group of each catalog row
    weights: torch.Tensor | None = None,  # (batch,) example weights
) -> torch.Tensor:
    """Softmax over the whole catalog (no sampling, so no logQ correction).

    Accidental hits as in `sampled_softmax_loss`: the rows in `masked` (the row's history) and
    the target's near-duplicates (same `dup_rows` group) are not negatives; the target itself
    always stays the label. Each rank's loss is its share of the global weighted mean, as above.
    """
    logits = u.float() @ items.float().T / temperature  # (batch, catalog), fp32
    b = logits.shape[0]
    rows = torch.arange(b, device=u.device)  # (batch,)
    block = torch.zeros_like(logits, dtype=torch.bool)  # (batch, catalog) True = not a negative
    if masked is not None and masked.numel():
        valid = masked >= 0  # (batch, M)
        block[rows.unsqueeze(1).expand_as(masked)[valid], masked[valid]] = True
    if dup_rows is not None:
        block |= dup_rows.unsqueeze(0) == dup_rows[targets].unsqueeze(1)  # (batch, catalog)
    block[rows, targets] = False
    logits = logits.masked_fill(block, _MASK_VALUE)
    per_row = F.cross_entropy(logits, targets, reduction="none")  # (batch,)
    w = torch.ones_like(per_row) if weights is None else weights.to(per_row.dtype)
    _, world = _world()
    total = w.sum().detach()
    if world > 1:
        dist.all_reduce(total)
        total = total / world
    return (per_row * w).sum() / total.clamp(min=1e-12)
