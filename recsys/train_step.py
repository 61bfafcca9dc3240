"""One contrastive batch through the DeepSpeed engine: in one pass, or with a gradient cache.

    contrastive_step(engine, module, b, micro) -> the batch's loss (a float)

The loss's negatives are the contrastive batch's items (every worker's, gathered), so more rows
per batch mean more negatives, and the activations of a whole batch of 4096 texts do not fit in
one device's memory. The gradient cache (Gao et al., 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup") decouples the two:

1. every micro-batch of `micro` rows is encoded without a graph (its RNG state kept);
2. the loss of the whole contrastive batch, gathered across workers as always, is computed on
   those embeddings as leaves, and its gradient w.r.t. each embedding (and the learnt
   temperature) taken with `torch.autograd.grad` - no parameter gradient is touched;
3. each micro-batch is re-encoded with a graph under its saved RNG state (the same dropout) and
   `engine.backward` runs on the surrogate `sum(embedding * cached gradient)`, whose parameter
   gradient is that micro-batch's share of the full batch's.

Why this works under ZeRO 1/2/3 where the libraries' versions fail ("Gradient computed twice for
this partition", sentence-transformers #3173 / #3531): ZeRO reduces and partitions gradients in
backward hooks, once per engine micro-step. Here each re-encoded micro-batch IS one engine
micro-step (forward, backward, step): the engine's gradient accumulation steps are
`train.grad_accum * contrastive_batch / batch_size` (recsys.train.deepspeed_config), so DeepSpeed
reduces, clips and steps at its own accumulation boundary exactly as for plain accumulation,
and no parameter sees two backward passes inside one micro-step. Peak activation memory is one
micro-batch's graph plus the batch's embeddings (batch x dim floats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recsys.losses import Memory, SampledSoftmaxLoss

# Per-row tensors of a training batch that come in (ids, mask) pairs: trimmed per micro-batch.
_TOKEN_PAIRS = (("q_ids", "q_mask"), ("d_ids", "d_mask"), ("h_ids", "h_mask"))


class TrainStep(nn.Module):
    """Towers + loss in one module, so DeepSpeed owns every trainable parameter (incl. temperature).

    forward(b) is the batch's loss; forward(b, mode="embed") its embeddings; forward(b, grads=g)
    the gradient cache's surrogate for one micro-batch (see the module docstring)."""

    def __init__(self, towers: nn.Module, loss: SampledSoftmaxLoss, memory_size: int = 0, dropout: bool = True) -> None:
        super().__init__()
        self.towers = towers
        self.loss = loss
        # Cross-batch memory: filled from the first step, used as negatives once `use_memory`
        # is set (the training loop sets it after train.memory_start_step).
        self.memory = Memory(memory_size) if memory_size else None
        self.use_memory = False
        self.dropout = dropout
        # `from_pretrained` hands the encoders over in eval mode: without this the towers trained
        # with dropout off until the first validation's `towers.train()` switched it on.
        self.train()

    def train(self, mode: bool = True) -> TrainStep:
        """Training mode; with dropout off (train.dropout=false) the encoders stay in eval mode."""
        super().train(mode)
        if mode and not self.dropout:
            from transformers import PreTrainedModel

            for child in self.towers.modules():
                if isinstance(child, PreTrainedModel):
                    child.eval()
        return self

    def embed(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q, d = self.towers(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"])  # (batch, dim) each
        hard = None
        if "h_ids" in b:
            hard = self.towers.encode_item(b["h_ids"], b["h_mask"]).view(q.shape[0], -1, d.shape[-1])  # (batch, n, dim)
        return q, d, hard

    def loss_on(self, q: torch.Tensor, d: torch.Tensor, hard: torch.Tensor | None, b: dict[str, torch.Tensor],
                temperature: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of embeddings q, d (batch, dim) and hard (batch, n, dim) of batch `b`'s rows.
        Called through `.forward`, not the module call: outside the engine's forward (the
        gradient cache's step 2) ZeRO-3's module hooks would fetch and release parameters
        around a call the engine does not track."""
        return self.loss.forward(
            q, d, weights=b["weights"], item_keys=b["item_keys"], dup_keys=b["dup_keys"],
            history_keys=b["history_keys"], group_keys=b.get("group_keys"), logq=b["logq"],
            hard_negatives=hard, hard_logq=b.get("h_logq"), hard_keys=b.get("h_keys"), hard_dup_keys=b.get("h_dups"),
            memory=self.memory if self.use_memory else None,
            temperature=temperature,
        )

    def remember(self, d: torch.Tensor, b: dict[str, torch.Tensor]) -> None:
        if self.memory is not None and self.training:
            self.memory.add(d, b["item_keys"], b["dup_keys"], b["group_keys"], b["logq"])

    def forward(self, b: dict[str, torch.Tensor], mode: str = "loss", grads: dict[str, torch.Tensor] | None = None) -> Any:
        q, d, hard = self.embed(b)
        if mode == "embed":
            return q, d, hard
        if grads is not None:  # the gradient cache's surrogate: its gradient is the cached one
            s = (q.float() * grads["q"]).sum() + (d.float() * grads["d"]).sum()  # () each
            if hard is not None:
                s = s + (hard.float() * grads["h"]).sum()
            if "temperature" in grads:
                s = s + self.loss.temperature * grads["temperature"]
            return s
        loss = self.loss_on(q, d, hard, b)
        self.remember(d, b)
        return loss


@dataclass
class _Rng:
    """The RNG state a micro-batch's first encoding started from (dropout masks replayed)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: Any) -> _Rng:
        device = torch.device(device)
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def micro_batches(b: dict[str, torch.Tensor], micro: int) -> list[dict[str, torch.Tensor]]:
    """`b`'s rows in slices of `micro`, each padded to its own longest text (left or right
    padding alike: only all-padding token columns go)."""
    rows = b["q_ids"].shape[0]
    hard_per_row = b["h_ids"].shape[0] // rows if "h_ids" in b else 0
    out = []
    for lo in range(0, rows, micro):
        hi = min(lo + micro, rows)
        c = {}
        for k, v in b.items():
            if k in ("h_ids", "h_mask"):
                c[k] = v[lo * hard_per_row:hi * hard_per_row]
            else:
                c[k] = v[lo:hi]
        for ids, mask in _TOKEN_PAIRS:
            if ids in c:
                keep = c[mask].bool().any(dim=0)  # (seq,)
                c[ids], c[mask] = c[ids][:, keep], c[mask][:, keep]
        out.append(c)
    return out


def contrastive_step(engine: Any, module: TrainStep, b: dict[str, torch.Tensor], micro: int) -> float:
    """Train on the contrastive batch `b` (this worker's rows): one engine micro-step when it
    fits in `micro` rows, else the gradient cache over micro-batches of `micro` rows, one engine
    micro-step each. The engine's gradient accumulation steps must count those micro-steps
    (recsys.train.deepspeed_config does). Returns the batch's loss."""
    rows = b["q_ids"].shape[0]
    if rows <= micro:
        loss = engine(b)
        engine.backward(loss)
        engine.step()
        return float(loss.detach().float())
    chunks = micro_batches(b, micro)
    states, parts = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(_Rng.capture(engine.device))
            parts.append(engine(c, mode="embed"))
    q = torch.cat([p[0] for p in parts]).float().requires_grad_()  # (batch, dim)
    d = torch.cat([p[1] for p in parts]).float().requires_grad_()  # (batch, dim)
    hard = torch.cat([p[2] for p in parts]).float().requires_grad_() if parts[0][2] is not None else None  # (batch, n, dim)
    learnt = module.loss.tau.learnt
    with torch.no_grad():
        tau = module.loss.temperature.clone()  # ()
    tau.requires_grad_(learnt)
    loss = module.loss_on(q, d, hard, b, temperature=tau)  # the whole batch, negatives from every worker
    leaves = [q, d] + ([hard] if hard is not None else []) + ([tau] if learnt else [])
    grads = list(torch.autograd.grad(loss, leaves))
    gq, gd = grads.pop(0), grads.pop(0)
    gh = grads.pop(0) if hard is not None else None
    g_tau = grads.pop(0) if learnt else None
    module.remember(d.detach(), b)
    lo = 0
    for i, (c, state) in enumerate(zip(chunks, states, strict=True)):
        hi = lo + c["q_ids"].shape[0]
        g = {"q": gq[lo:hi], "d": gd[lo:hi], **({"h": gh[lo:hi]} if gh is not None else {})}
        if i == 0 and g_tau is not None:
            g["temperature"] = g_tau  # once per batch: the temperature's gradient is the batch's
        state.restore()
        surrogate = engine(c, grads=g)
        # engine.backward divides by its accumulation steps (grad_accum x micro-batches); the
        # micro-batches of one batch add up to its gradient, so undo their share of that.
        engine.backward(surrogate * len(chunks))
        engine.step()
        lo = hi
    return float(loss.detach())
