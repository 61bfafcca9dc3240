"""Memory plan: what one training worker's device will hold, printed (and checked) before launch.

    plan(cfg) -> MemoryPlan       bytes per device, by part; .table() prints them
    check(cfg) -> MemoryPlan      logs the table; raises MemoryPlanDoesNotFit (a ValueError) when
                                  it cannot fit and train.memory_check=refuse, naming settings that fit

What is counted, per worker (device), read from DeepSpeed 0.19.8's own allocations
(runtime/engine.py, runtime/fp16/unfused_optimizer.py, runtime/zero/stage_1_and_2.py,
runtime/zero/stage3.py, runtime/zero/partitioned_param_coordinator.py) for the client torch
AdamW recsys.train passes, with P = all parameters, T = trainable ones, N = train.num_workers,
b = bytes per parameter in the model dtype (4 fp32, 2 bf16/fp16):

| | ZeRO 0 | ZeRO 1 | ZeRO 2 | ZeRO 3 |
| --- | --- | --- | --- | --- |
| parameters | bP | bP (flat buffer) | bP | bP/N + all of it gathered* |
| fp32 master weights | 4T (16-bit only) | 4T/N (always, also fp32) | 4T/N | 4T/N (always, also fp32**) |
| gradients | bT | bT | bT/N + bucket | bT/N + bucket (offload: + 4T/N fp32) |
| AdamW states | 8T | 8T/N | 8T/N | 8T/N |
| at the step | 4T fp32 grads (16-bit) | 4T/N fp32 grads | 4T/N | 4T/N fp32 flat grads (no offload) |

(*) ZeRO-3 keeps a gathered parameter until no use of it follows within
`stage3_max_reuse_distance` (1e9) parameters in the step's trace. Backward walks the forward in
reverse, so when backward starts the forward's last 5e8 parameters (the whole model when it is
smaller) are still gathered on every rank, plus the prefetch bucket; they are released again
by the end of backward. (**) ZeRO-3 would share an fp32 partition as its master, but DeepSpeed
compares the partition's torch.device with the accelerator's device name, a str, which is never
equal (stage3._create_fp32_partitions): it clones in every precision. Without offload it also
drops the fp32 gradient buffer it allocates at init and, at the step, flattens the gradient
partition into a new fp32 tensor (_prepare_fp32_grad_for_sub_group). The reduce bucket
(`reduce_bucket_size`, 5e8 elements) is allocated whole on a GPU; on CPU only its touched pages
count, at most T. ZeRO-1/2 allocate it at backward's first gradient and release it at backward's
end (setup_buckets, _release_ipg_buffers): it and ZeRO-3's gathered parameters are alive with the
activations, not at the optimizer step; ZeRO-3's bucket lives from init on.
train.offload_optimizer moves master weights, AdamW states and the fp32 gradients to host memory
(on a CPU-only run that is the same memory). LoRA (model.lora): T is the
adapters' r*(in+out) per targeted linear plus the projection; frozen weights take no gradient or
optimizer state.

Activations are what autograd saves for backward, per transformer layer, for every text of one
micro-batch (train.batch_size rows: queries at max_query_tokens, items and hard negatives at
max_item_tokens; the gradient cache re-encodes one micro-batch at a time), counted tensor by
tensor from the BERT and Qwen2/Llama/Qwen3 layers of transformers 5 (tests check the count
against the autograd graph). CPU attention with dropout runs torch's math kernel in fp32 (the
S^2 probabilities saved); GPU and dropout-free attention run fused kernels. With gradient
checkpointing a layer keeps its input, and one layer is recomputed at a time. The loss's
logits are (rows per contrastive batch) x (that times N gathered + hard negatives + memory) in
fp32, several tensors of that size at once. Peak = model states + ZeRO-3's reduce bucket + the
larger of (activations + logits + the buffers alive only during backward) and the optimizer
step's temporaries. On CPU (train.use_gpu false) ZeRO-0-2's gradients and ZeRO-1/2's bucket are
empty allocations whose pages become resident as backward writes them, while it frees the
activations: they count with backward's end and the step, not with the activation peak. It fits
when the peak is at most HEADROOM of the device's memory: the rest is for the CUDA context,
allocator fragmentation, NCCL buffers (on CPU: the process's runtime, ~0.5 GiB).

Device memory: train.device_memory_gib, else detected: the first GPU's total memory when
train.use_gpu (unknown when this process sees no GPU: then the check only warns), else host RAM
divided by train.num_workers (the assumption: every worker on this node, as in local mode; set
train.device_memory_gib on a multi-node CPU cluster).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

GIB = 1024**3
# Fits when the peak stays below this share of the device: the rest is the CUDA context
# (~0.5-1 GiB), allocator fragmentation and communication buffers we do not model.
HEADROOM = 0.9
# DeepSpeed 0.19.8's defaults (deepspeed/runtime/zero/config.py); recsys.train sets none of them.
# tests/test_memory_plan.py checks they still are DeepSpeed's.
REDUCE_BUCKET_SIZE = 500_000_000
PREFETCH_BUCKET_SIZE = 50_000_000
PARAM_PERSISTENCE_THRESHOLD = 100_000
MAX_REUSE_DISTANCE = 1_000_000_000
# Per history slot of a next-item row, the loss compares its key with every batch item: bool
# (rows, history, N) tensors, three alive at once (recsys.losses).
_HISTORY_BOOL_TENSORS = 3
# fp32 tensors of the logits' size alive at the loss's peak: q@d.T, minus logQ, masked_fill,
# log_softmax saved by cross_entropy, and two gradients in backward; plus a bool mask.
_LOGIT_FP32_TENSORS = 6
# A linear of the first transformer layer (BERT "encoder.layer.0.", Llama/Qwen "layers.0.").
_FIRST_LAYER = re.compile(r"(^|\.)(layer|layers|h|block)\.0\.")


class MemoryPlanDoesNotFit(ValueError):
    """The configured run needs more memory per device than it has; the message names settings that fit."""

    def __init__(self, message: str, plan: MemoryPlan, suggestions: list[str]) -> None:
        super().__init__(message)
        self.plan = plan
        self.suggestions = suggestions


@dataclass(frozen=True)
class Lora:
    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arch:
    """One encoder's shape, read from its Hugging Face config and a meta-device copy of it."""

    kind: str  # "encoder" (BERT family) | "decoder" (Qwen2 / Llama / Qwen3 family)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    attention_dropout: float
    hidden_dropout: float
    qk_norm: bool
    params: int
    largest_module: int  # parameters of the biggest module holding them directly (ZeRO-3's fetch unit)
    small_params: int  # in parameters below ZeRO-3's persistence threshold: kept whole on every rank
    linears: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features)

    def lora_params(self, lora: Lora) -> int:
        return sum(lora.r * (i + o) for name, i, o in self.linears if _targeted(name, lora.target_modules))

    def linear_suffixes(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name, _, _ in self.linears})


def _targeted(name: str, targets: tuple[str, ...]) -> bool:
    # peft's rule for a list: the module's name equals a target or ends with "." + target.
    if targets in (("all-linear",), ("all_linear",)):
        return True
    return any(name == t or name.endswith("." + t) for t in targets)


@functools.lru_cache(maxsize=16)
def describe_model(path: str) -> Arch:
    """The shape of the encoder at `path` (a folder or hub id transformers can open)."""
    from transformers import AutoConfig

    return describe_config(AutoConfig.from_pretrained(path))


def describe_config(config: Any) -> Arch:
    """The shape of an encoder built from a transformers config (built on the meta device: no memory)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        try:
            model = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:  # an architecture without a pooler option
            model = AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # recsys.model drops it too (it would take no gradient)
    decoder = bool(getattr(config, "is_decoder", False)) or not hasattr(config, "type_vocab_size")
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    largest = 0
    linears = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        largest = max(largest, own)
        if isinstance(module, torch.nn.Linear):
            linears.append((name, module.in_features, module.out_features))
    return Arch(
        kind="decoder" if decoder else "encoder",
        hidden=hidden,
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate=int(config.intermediate_size),
        vocab=int(config.vocab_size),
        attention_dropout=float(getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0) or 0.0),
        hidden_dropout=float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0),
        qk_norm=any(n.endswith("q_norm") for n, _ in model.named_modules()),
        params=sum(p.numel() for p in model.parameters()),
        largest_module=largest,
        small_params=sum(p.numel() for p in model.parameters() if p.numel() < PARAM_PERSISTENCE_THRESHOLD),
        linears=tuple(linears),
    )


@dataclass(frozen=True)
class Settings:
    """What the plan reads from a Config: plain values, so the suggestions can vary them."""

    arch: Arch
    separate_towers: bool
    projection_dim: int
    query_tokens: int
    item_tokens: int
    pooling: str
    lora: Lora | None
    checkpointing: bool
    attn_implementation: str
    zero_stage: int
    offload: bool
    precision: str
    batch_size: int
    rows_per_batch: int
    num_workers: int
    hard_negatives: int
    memory_size: int
    gather_negatives: bool
    history: int  # history slots of a next-item row compared in the loss (0 for search)
    use_gpu: bool
    device_bytes: int | None
    device_source: str

    @property
    def b(self) -> int:
        return 4 if self.precision == "fp32" else 2


def _lora_of(mcfg: Any) -> Lora | None:
    lora = getattr(mcfg, "lora", None)
    if lora is None:
        return None
    get = (lambda k, d: lora.get(k, d)) if isinstance(lora, dict) else (lambda k, d: getattr(lora, k, d))
    targets = get("target_modules", None) or ["all-linear"]
    return Lora(int(get("r", 8)), float(get("alpha", 16)), float(get("dropout", 0.0) or 0.0),
                tuple([targets] if isinstance(targets, str) else targets))


def _host_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        text = open("/proc/meminfo").read()
        return int(re.search(r"^MemTotal:\s+(\d+) kB", text, re.M)[1]) * 1024


def device_memory(cfg: Any) -> tuple[int | None, str]:
    """(bytes, where the figure comes from) for one worker's device; None = unknown."""
    t = cfg.train
    given = float(getattr(t, "device_memory_gib", 0) or 0)
    if given > 0:
        return int(given * GIB), "train.device_memory_gib"
    if t.use_gpu:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"detected: {props.name}"
        return None, "unknown: this process sees no GPU (set train.device_memory_gib)"
    ram = _host_ram()
    return ram // t.num_workers, f"detected: host RAM {ram / GIB:.1f} GiB / {t.num_workers} workers on this node"


def settings_of(cfg: Any, arch: Arch | None = None) -> Settings:
    from recsys.encoder import resolve_model_path

    m, t = cfg.model, cfg.train
    if arch is None:
        arch = describe_model(resolve_model_path(m.name_or_path))
    dev, source = device_memory(cfg)
    return Settings(
        arch=arch,
        separate_towers=bool(m.separate_towers),
        projection_dim=int(m.projection_dim),
        query_tokens=int(m.max_query_tokens),
        item_tokens=int(m.max_item_tokens),
        pooling=str(getattr(m, "pooling", "mean")),
        lora=_lora_of(m),
        checkpointing=bool(getattr(m, "gradient_checkpointing", False)),
        attn_implementation=str(getattr(m, "attn_implementation", "sdpa") or "sdpa"),
        zero_stage=int(t.zero_stage),
        offload=bool(t.offload_optimizer),
        precision=str(t.precision),
        batch_size=int(t.batch_size),
        rows_per_batch=int(t.contrastive_batch or t.batch_size),
        num_workers=int(t.num_workers),
        hard_negatives=int(t.hard_negatives),
        memory_size=int(t.memory_size),
        gather_negatives=bool(t.gather_negatives),
        history=0 if t.task == "search" else int(cfg.data.max_history),
        use_gpu=bool(t.use_gpu),
        device_bytes=dev,
        device_source=source,
    )


# ---------------------------------------------------------------------------------------------
# Activations: bytes autograd saves for one pass of `rows` texts of `seq` tokens.


def layer_activation_bytes(a: Arch, rows: int, seq: int, e: int, gpu: bool, lora: Lora | None = None,
                           attn_implementation: str = "sdpa") -> int:
    """One transformer layer's saved tensors in training mode (dropout on), e = activation bytes."""
    t = rows * seq  # tokens
    h, i = a.hidden, a.intermediate
    qd, kvd = a.heads * a.head_dim, a.kv_heads * a.head_dim
    s2 = rows * a.heads * seq * seq  # attention probabilities' elements
    lse = 4 * rows * a.heads * seq  # fused kernels' fp32 log-sum-exp
    if a.kind == "encoder":
        mask = 1 if gpu else e  # dropout masks: bool on CUDA (native_dropout), the dtype on CPU
        linear_in = t * (3 * e * h + e * i)  # inputs of QKV (shared), attention output, FFN in and out
        out = t * e * i  # GELU in
        out += t * 2 * e * h  # two LayerNorm inputs
        out += t * 2 * mask * h  # two hidden dropouts' masks
        fused = gpu or (a.attention_dropout == 0 and attn_implementation != "eager")
        if attn_implementation == "eager":
            out += t * 3 * e * qd + s2 * (2 * e + mask)  # q, k, v; softmax out, dropout mask, dropped probs
        elif fused:
            out += t * 3 * e * qd + lse  # q, k, v (output = the next linear's input) + lse
        else:  # CPU math kernel: everything in fp32 (bf16 inputs upcast)
            out += t * 3 * 4 * qd + s2 * 3 * 4  # q, k, v; softmax out, dropout mask, dropped probs
    else:
        linear_in = t * (3 * e * h + e * i)  # inputs of QKV (shared), o_proj, gate/up (shared), down_proj
        out = t * 3 * e * i  # SwiGLU: gate (SiLU in), SiLU out, up
        out += t * 2 * 4 * h  # two RMSNorms' fp32 inputs
        norm_w = t * 2 * e * h  # the normalised copies the norms' weight multiplications keep
        out += t * 3 * e * qd + lse  # fused attention: q, k and v repeated to all heads (GQA), lse
        if a.qk_norm:
            out += t * (4 + e) * (qd + kvd)  # q_norm / k_norm over the head dim
        if attn_implementation == "eager":
            out += s2 * 2 * e  # softmax output and the probabilities fed to @V
    if a.kind == "encoder":
        norm_w = 0
    if lora is None or lora.dropout == 0:
        # Frozen (LoRA) weights need no saved input or normalised copy, but LoRA's A, without
        # dropout, keeps the same inputs: counted as in full fine-tuning (an upper bound).
        out += linear_in + norm_w
    if lora is not None:
        first_layer = [(n, i_) for n, i_, _ in a.linears if _FIRST_LAYER.search(n) and _targeted(n, lora.target_modules)]
        for _, fan_in in first_layer:
            out += t * e * lora.r  # A's output, B's input
            if lora.dropout > 0:
                out += t * fan_in * (e + (1 if gpu else e))  # dropout's output (A's input) and mask
    return out


def pass_activation_bytes(a: Arch, rows: int, seq: int, e: int, gpu: bool, checkpointing: bool,
                          lora: Lora | None = None, attn_implementation: str = "sdpa") -> int:
    """One encoder pass: embeddings, layers (or their checkpoints and one recomputed layer),
    the final norm and pooling, plus backward's workspace for the widest layer tensors."""
    t = rows * seq
    layer = layer_activation_bytes(a, rows, seq, e, gpu, lora, attn_implementation)
    if a.kind == "encoder":
        edge = t * a.hidden * (e + (1 if gpu else e))  # embedding LayerNorm input, its dropout's mask
    else:
        edge = t * a.hidden * (4 + e)  # the final RMSNorm
    edge += t * a.hidden * e + rows * seq * seq * e  # last hidden state (pooling), the attention mask
    # Backward of a layer: gradients of its widest tensors are alive next to the saved ones.
    workspace = 2 * t * e * max(a.intermediate, a.hidden)
    if checkpointing:
        return a.layers * t * a.hidden * e + layer + edge + workspace
    return a.layers * layer + edge + workspace


# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    settings: Settings
    rows: list[tuple[str, int, str]] = field(default_factory=list)  # (part, bytes per device, how)
    parameters: int = 0
    gradients: int = 0
    optimizer_states: int = 0  # AdamW moments and fp32 master weights
    buffers: int = 0  # DeepSpeed's reduce bucket, ZeRO-3's gathered parameters
    backward_buffers: int = 0  # the part of `buffers` alive only during backward (not at the step)
    late_gradients: int = 0  # gradients and bucket first written during backward on CPU: not with the activations
    activations: int = 0  # as configured (checkpointing on or off)
    activations_plain: int = 0  # without gradient checkpointing
    activations_checkpointed: int = 0  # with it
    logits: int = 0
    step_temporaries: int = 0
    host_offload: int = 0  # bytes per worker moved to host memory by train.offload_optimizer
    trainable_params: int = 0
    total_params: int = 0
    total: int = 0
    device_bytes: int | None = None
    device_source: str = ""

    @property
    def model_states(self) -> int:
        """Parameters, gradients and optimizer states on the device (DeepSpeed's estimators' scope)."""
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def usable(self) -> int | None:
        return None if self.device_bytes is None else int(self.device_bytes * HEADROOM)

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.total <= self.usable

    def table(self) -> str:
        s = self.settings
        head = (f"memory plan per device: {s.arch.kind} {s.arch.params / 1e6:.1f}M params x "
                f"{2 if s.separate_towers else 1} tower(s), {self.trainable_params / 1e6:.2f}M trainable"
                f"{f' (LoRA r={s.lora.r})' if s.lora else ''}; ZeRO-{s.zero_stage}{' + offload' if s.offload else ''}, "
                f"{s.precision}, {s.num_workers} workers, micro-batch {s.batch_size} rows"
                f"{f' of a {s.rows_per_batch}-row contrastive batch' if s.rows_per_batch > s.batch_size else ''}, "
                f"{s.query_tokens}/{s.item_tokens} query/item tokens"
                f"{f', {s.hard_negatives} hard negatives' if s.hard_negatives else ''}, "
                f"checkpointing {'on' if s.checkpointing else 'off'}")
        width = max(len(r[0]) for r in self.rows)
        lines = [head, f"  {'part':<{width}}  {'GiB':>9}  how"]
        for name, nbytes, how in self.rows:
            lines.append(f"  {name:<{width}}  {nbytes / GIB:9.3f}  {how}")
        late = f"; {self.late_gradients / GIB:.3f} GiB of gradients and bucket written after the activation peak (CPU)" \
            if self.late_gradients else ""
        lines.append(f"  {'peak (total)':<{width}}  {self.total / GIB:9.3f}  model states + buffers kept + "
                     f"max(activations + logits + backward-only buffers, step temporaries){late}")
        if self.host_offload:
            lines.append(f"  {'host (offloaded)':<{width}}  {self.host_offload / GIB:9.3f}  per worker, in host RAM")
        if self.device_bytes is None:
            lines.append(f"  device memory unknown ({self.device_source}): not checked")
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {'device':<{width}}  {self.device_bytes / GIB:9.3f}  {self.device_source}; "
                         f"usable {HEADROOM:.0%} = {self.usable / GIB:.3f} GiB: {verdict}")
        return "\n".join(lines)


def _plan(s: Settings) -> MemoryPlan:
    a, n, b = s.arch, s.num_workers, s.b
    towers = 2 if s.separate_towers else 1
    base = a.params * towers
    proj = a.hidden * s.projection_dim
    if s.lora is not None:
        lora_params = a.lora_params(s.lora) * towers
        trainable = lora_params + proj  # the frozen base takes no gradient or optimizer state
    else:
        trainable = base + proj
    total_params = base + proj + (trainable - proj if s.lora else 0)
    p = PlanBuilder(s)
    z = s.zero_stage
    # On a CPU-only run "offloaded" states still live in the memory we plan for.
    off_dev = s.offload and s.use_gpu
    sixteen = b == 2

    # Parameters.
    if z < 3:
        p.add("parameters", b * total_params, f"{b} B x {total_params / 1e6:.1f}M, whole on every worker")
    else:
        persistent = a.small_params * towers
        p.add("parameters", b * (total_params // n + persistent * (n - 1) // n),
              f"{b} B x {total_params / 1e6:.1f}M / {n} workers (params < {PARAM_PERSISTENCE_THRESHOLD:.0e} whole)")
    # fp32 master weights and AdamW's two moments.
    opt = 8 * trainable // (n if z >= 1 else 1)
    if z == 0:
        master = 4 * trainable if sixteen else 0
    elif z in (1, 2):
        master = 4 * trainable // n  # a clone of the partition, in fp32 also
    else:
        # Cloned in every precision: DeepSpeed's "share it when already fp32 on the device" test
        # compares a torch.device with a str and never holds (module docstring, **).
        master = 4 * trainable // n
    how_opt = f"AdamW 8 B x {trainable / 1e6:.2f}M trainable{f' / {n}' if z >= 1 else ''}"
    if master:
        how_opt += " + fp32 master weights 4 B each"
    # Gradients.
    if z in (0, 1):
        grads = b * trainable
        how_g = f"{b} B x trainable, whole (reduced at the step)"
        fp32_step = 4 * trainable // (n if z == 1 else 1) if (sixteen or z == 1) else 0
    elif z == 2:
        grads = b * trainable // n
        how_g = f"{b} B x trainable / {n} (partition)"
        fp32_step = 4 * trainable // n
    elif s.offload:
        grads = b * trainable // n
        fp32_grads = 4 * trainable // n  # the fp32 partition's .grad, kept from init on with offload
        how_g = f"{b} B x trainable / {n} + fp32 4 B x trainable / {n}"
        fp32_step = 0
    else:
        # Without offload the init's fp32 gradient buffer is dropped again (initialize_optimizer_states
        # sets .grad = None); the step flattens the partition into a new fp32 tensor instead.
        grads = b * trainable // n
        fp32_grads = 0
        how_g = f"{b} B x trainable / {n} (partition)"
        fp32_step = 4 * trainable // n
    if z == 3:
        if off_dev:
            p.host += fp32_grads + grads  # the grad partitions live on the offload device too
            p.add("gradients", 0, "partitions on host (offload)")
        else:
            p.add("gradients", grads + fp32_grads, how_g)
    elif off_dev and z in (1, 2):
        p.host += 4 * trainable // n  # the fp32 partition's .grad, pinned on host
        p.add("gradients", grads, how_g + "; fp32 copy on host")
    else:
        p.add("gradients", grads, how_g)
    if not s.use_gpu and z < 3:
        # On CPU a page becomes resident when it is first written. Backward writes the gradients
        # (ZeRO-0: each param.grad; ZeRO-1/2: the reduce bucket and the gradient partition, both
        # allocated empty during backward) layer by layer as it frees that layer's saved
        # activations, and ZeRO-0-2 drop the gradients after every step: at the activation peak
        # (backward's start) neither is resident yet. Measured (bench.memory_plan, fp32 ZeRO-2):
        # backward's peak is the forward's (+250 MiB vs +248 MiB) though it writes 93 MiB of
        # gradients into a 93 MiB bucket. They coexist with backward's end and the step instead.
        # A GPU allocates them whole (caching allocator) while the activations still exist; ZeRO-3
        # zero-fills its gradient partition at init, so it is resident from then on.
        p.late_grads = grads
    if off_dev and z >= 1:
        p.host += opt + master
        p.add("optimizer states", 0, how_opt + ": on host (offload)")
    else:
        p.add("optimizer states", opt + master, how_opt)
    # DeepSpeed buffers.
    if z >= 1:
        bucket = REDUCE_BUCKET_SIZE if s.use_gpu else min(REDUCE_BUCKET_SIZE, trainable)
        p.add("reduce bucket", b * bucket,
              f"{REDUCE_BUCKET_SIZE:.0e} elements on GPU; on CPU only touched pages (<= trainable)"
              f"{'; backward only' if z < 3 else ''}")
        if z < 3:  # ZeRO-1/2: allocated at backward's first gradient, released at its end
            p.backward_only += b * bucket
            if not s.use_gpu:
                p.late_bucket = b * bucket  # written as the gradients are: see late_grads above
    if z == 3:
        # At the activation peak (backward's start) a gathered module stays whole when it is used
        # again within stage3_max_reuse_distance parameters of the trace: the last half of that
        # distance's worth of the forward (backward comes back through it in reverse).
        kept = min(total_params, MAX_REUSE_DISTANCE // 2)
        gathered = kept - kept // n
        if kept < total_params:
            gathered += min(PREFETCH_BUCKET_SIZE, total_params - kept)
        p.add("gathered parameters", b * gathered + b * a.largest_module,
              f"{kept / 1e6:.0f}M kept whole (stage3_max_reuse_distance {MAX_REUSE_DISTANCE:.0e} / 2) + prefetch "
              "+ the largest module's full gradient; backward only")
        p.backward_only += b * gathered + b * a.largest_module  # released by backward's end
    # Activations.
    e = b
    gpu = s.use_gpu

    def acts(ckpt: bool) -> int:
        rows = s.batch_size
        out = pass_activation_bytes(a, rows, s.query_tokens, e, gpu, ckpt, s.lora, s.attn_implementation)
        out += pass_activation_bytes(a, rows, s.item_tokens, e, gpu, ckpt, s.lora, s.attn_implementation)
        if s.hard_negatives:
            out += pass_activation_bytes(a, rows * s.hard_negatives, s.item_tokens, e, gpu, ckpt, s.lora, s.attn_implementation)
        return out

    plain, ckpt = acts(False), acts(True)
    chosen = ckpt if s.checkpointing else plain
    p.activations = (plain, ckpt, chosen)
    p.add("activations", chosen,
          f"{'with' if s.checkpointing else 'without'} checkpointing; {(plain if s.checkpointing else ckpt) / GIB:.3f} GiB "
          f"{'without' if s.checkpointing else 'with'}")
    # The loss over the contrastive batch.
    rows = s.rows_per_batch
    cols = rows * (n if s.gather_negatives else 1) + s.memory_size + s.hard_negatives
    dim = s.projection_dim or a.hidden
    logits = rows * cols * (4 * _LOGIT_FP32_TENSORS + 1) + rows * s.history * cols * _HISTORY_BOOL_TENSORS
    if rows > s.batch_size:  # the gradient cache's embeddings and their gradients
        logits += 2 * 4 * rows * dim * (2 + s.hard_negatives)
    p.add("loss logits", logits, f"{rows} x {cols} fp32 ({_LOGIT_FP32_TENSORS} alive) + history masks")
    # The optimizer step's temporaries (activations are gone by then).
    # torch AdamW's temporaries: on CUDA (foreach) one fp32 copy of what it steps; on CPU (one
    # tensor at a time) two of its largest tensor: exp_avg_sq.sqrt() and its division. ZeRO 1-3
    # hand it one flat partition, ZeRO-0 the parameters themselves.
    largest = a.largest_module if s.lora is None else max((i * s.lora.r for _, i, _ in a.linears), default=0)
    stepped = trainable // n if z >= 1 else trainable
    adam_tmp = 4 * stepped if gpu else 2 * 4 * (stepped if z >= 1 else largest)
    if off_dev:
        adam_tmp = 0  # on host
    step = fp32_step + adam_tmp
    if z == 0:
        step += b * min(REDUCE_BUCKET_SIZE, trainable)  # the all-reduce's flattened bucket
    p.step = step
    plan = p.finish(trainable, total_params)
    return plan


class PlanBuilder:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.rows: list[tuple[str, int, str]] = []
        self.host = 0
        self.step = 0
        self.backward_only = 0  # buffers alive with the activations but released before the step
        self.late_grads = 0  # gradients first written during backward (CPU, ZeRO-0-2): not with the activations
        self.late_bucket = 0  # the same for the reduce bucket (CPU, ZeRO-1/2)
        self.activations = (0, 0, 0)

    def add(self, name: str, nbytes: int, how: str) -> None:
        self.rows.append((name, int(nbytes), how))

    def finish(self, trainable: int, total_params: int) -> MemoryPlan:
        get = dict((r[0], r[1]) for r in self.rows)
        plain, ckpt, chosen = self.activations
        plan = MemoryPlan(
            settings=self.s,
            parameters=get["parameters"],
            gradients=get["gradients"],
            optimizer_states=get["optimizer states"],
            buffers=get.get("reduce bucket", 0) + get.get("gathered parameters", 0),
            backward_buffers=self.backward_only,
            late_gradients=self.late_grads + self.late_bucket,
            activations=chosen,
            activations_plain=plain,
            activations_checkpointed=ckpt,
            logits=get["loss logits"],
            step_temporaries=self.step,
            host_offload=self.host,
            trainable_params=trainable,
            total_params=total_params,
            device_bytes=self.s.device_bytes,
            device_source=self.s.device_source,
        )
        self.rows.append(("step temporaries", self.step, "fp32 gradient copies, AdamW's temporaries (after backward)"))
        plan.rows = self.rows
        # Resident throughout, then the largest of: backward's start (activations, loss, the buffers
        # backward allocates), backward's end (the late gradients and bucket written) and the step.
        kept = plan.model_states - self.late_grads + plan.buffers - plan.backward_buffers
        plan.total = kept + max(plan.activations + plan.logits + plan.backward_buffers - self.late_bucket,
                                self.late_grads + self.late_bucket,
                                self.late_grads + plan.step_temporaries)
        return plan


def plan(cfg: Any, arch: Arch | None = None) -> MemoryPlan:
    """The memory plan of `cfg`'s training run, per worker (device). `arch` skips reading the model."""
    return _plan(settings_of(cfg, arch))


# ---------------------------------------------------------------------------------------------
# Suggestions: single changes first, then cumulative ones, each checked by _plan.


def _default_lora(a: Arch) -> Lora:
    return Lora(r=16, alpha=32, dropout=0.05, target_modules=tuple(a.linear_suffixes()))


def _lora_override(lora: Lora) -> str:
    return f"model.lora={{r: {lora.r}, alpha: {lora.alpha:g}, dropout: {lora.dropout:g}, target_modules: [{', '.join(lora.target_modules)}]}}"


def _candidates(s: Settings) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if not s.checkpointing:
        out.append(("model.gradient_checkpointing=true", {"checkpointing": True}))
    if s.zero_stage < 3 and s.num_workers > 1:
        out.append(("train.zero_stage=3", {"zero_stage": 3}))
    if s.use_gpu and not s.offload and s.zero_stage >= 1:
        out.append(("train.offload_optimizer=true", {"offload": True}))
    if s.use_gpu and s.precision == "fp32":
        out.append(("train.precision=bf16", {"precision": "bf16"}))
    if s.lora is None:
        lora = _default_lora(s.arch)
        out.append((_lora_override(lora), {"lora": lora}))
    # A smaller micro-batch, the contrastive batch (the negatives) kept: the gradient cache.
    rows = s.rows_per_batch
    for micro in sorted((d for d in range(1, s.batch_size) if rows % d == 0), reverse=True):
        if micro <= s.batch_size // 2:
            out.append((f"train.batch_size={micro} with train.contrastive_batch={rows}", {"batch_size": micro}))
    return out


def suggestions(s: Settings) -> list[tuple[str, MemoryPlan]]:
    """Settings that make the plan fit: each single change that does, else the first cumulative
    combination that does (in the order: checkpointing, ZeRO-3, offload, bf16, LoRA, micro-batch)."""
    cands = _candidates(s)
    micro = [c for c in cands if c[0].startswith("train.batch_size=")]
    others = [c for c in cands if c not in micro]
    fitting: list[tuple[str, MemoryPlan]] = []
    for text, change in others:
        p = _plan(dataclasses.replace(s, **change))
        if p.fits:
            fitting.append((text, p))
    for text, change in micro:  # the largest micro-batch that fits
        p = _plan(dataclasses.replace(s, **change))
        if p.fits:
            fitting.append((text, p))
            break
    if fitting:
        return fitting
    texts: list[str] = []
    combined: dict[str, Any] = {}
    for text, change in others:
        texts.append(text)
        combined.update(change)
        p = _plan(dataclasses.replace(s, **combined))
        if p.fits:
            return [(" and ".join(texts), p)]
    for text, change in micro:
        p = _plan(dataclasses.replace(s, **combined, **change))
        if p.fits:
            return [(" and ".join([*texts, text]), p)]
    return []


def check(cfg: Any, arch: Arch | None = None) -> MemoryPlan | None:
    """Log the plan; with train.memory_check=refuse raise MemoryPlanDoesNotFit when it cannot fit
    (warn: log a warning instead; off: neither plan nor check, so a model the plan cannot read
    still launches)."""
    mode = getattr(cfg.train, "memory_check", "refuse")
    if mode == "off":
        return None
    try:
        s = settings_of(cfg, arch)
    except Exception as e:  # noqa: BLE001 - a model the plan cannot read (offline driver, remote code) still trains
        log.warning("memory plan: could not read the shape of model.name_or_path=%r (%s: %s); the run is not checked",
                    cfg.model.name_or_path, type(e).__name__, e)
        return None
    result = _plan(s)
    log.info("%s", result.table())
    if result.fits is None:
        log.warning("memory plan: %s; the run was not checked against it", result.device_source)
        return result
    if result.fits:
        return result
    found = suggestions(s)
    need, have = result.total / GIB, result.usable / GIB
    if found:
        hint = "settings that would fit: " + "; ".join(f"{t} ({p.total / GIB:.2f} GiB)" for t, p in found)
    else:
        hint = "no combination of gradient checkpointing, ZeRO-3, offload, bf16, LoRA and a smaller micro-batch fits: more workers or a bigger device"
    message = (f"memory plan: the run needs {need:.2f} GiB per device but {have:.2f} GiB is usable "
               f"({HEADROOM:.0%} of {result.device_bytes / GIB:.2f} GiB, {result.device_source}); {hint}. "
               f"train.memory_check=warn launches anyway")
    if mode == "warn":
        log.warning("%s", message)
        return result
    raise MemoryPlanDoesNotFit(message, result, [t for t, _ in found])
