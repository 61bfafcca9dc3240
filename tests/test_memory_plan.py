"""recsys.memory_plan: the arithmetic by hand, DeepSpeed's estimator, the autograd count, refusal."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

from recsys import memory_plan as mp
from recsys.config import load_config

# A hand-made encoder shape: the sums below are then exact numbers, not a model's.
ARCH = mp.Arch(
    kind="encoder", hidden=64, layers=2, heads=2, kv_heads=2, head_dim=32, intermediate=128, vocab=1000,
    attention_dropout=0.1, hidden_dropout=0.1, qk_norm=False,
    params=1_000_000, largest_module=64_000, small_params=10_000,
    linears=tuple((f"encoder.layer.{i}.attention.self.{n}", 64, 64) for i in range(2) for n in ("query", "key", "value")),
)
P = ARCH.params


def _cfg(*overrides: str):  # noqa: ANN202
    return load_config(None, ["train.device_memory_gib=1000", "train.contrastive_batch=0", *overrides])


def _plan(*overrides: str, arch: mp.Arch = ARCH, **settings) -> mp.MemoryPlan:  # noqa: ANN003
    s = mp.settings_of(_cfg(*overrides), arch)
    return mp._plan(dataclasses.replace(s, **settings))


def test_deepspeed_defaults_are_the_ones_planned_for():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig()
    assert (z.reduce_bucket_size, z.prefetch_bucket_size, z.param_persistence_threshold, z.max_reuse_distance) == (
        mp.REDUCE_BUCKET_SIZE, mp.PREFETCH_BUCKET_SIZE, mp.PARAM_PERSISTENCE_THRESHOLD, mp.MAX_REUSE_DISTANCE)


def test_zero0_fp32_holds_everything_whole():
    p = _plan("train.zero_stage=0", "train.precision=fp32", "train.num_workers=2")
    assert (p.parameters, p.gradients, p.optimizer_states) == (4 * P, 4 * P, 8 * P)
    assert p.buffers == 0


def test_zero0_bf16_adds_fp32_master_weights():
    p = _plan("train.zero_stage=0", "train.precision=bf16", "train.num_workers=2")
    assert (p.parameters, p.gradients, p.optimizer_states) == (2 * P, 2 * P, 12 * P)
    assert p.step_temporaries >= 4 * P  # the fp32 gradient copies the unfused optimizer makes at the step


def test_zero2_bf16_partitions_gradients_and_optimizer_states():
    p = _plan("train.zero_stage=2", "train.precision=bf16", "train.num_workers=4")
    assert (p.parameters, p.gradients, p.optimizer_states) == (2 * P, 2 * P // 4, 12 * P // 4)
    assert p.buffers == 2 * P  # the reduce bucket, on CPU only its touched pages: at most the gradients


def test_zero1_fp32_keeps_a_master_copy_of_its_partition():
    p = _plan("train.zero_stage=1", "train.precision=fp32", "train.num_workers=4")
    assert (p.parameters, p.gradients, p.optimizer_states) == (4 * P, 4 * P, 12 * P // 4)


def test_zero3_bf16_partitions_parameters_too():
    p = _plan("train.zero_stage=3", "train.precision=bf16", "train.num_workers=4")
    assert p.parameters == 2 * (P // 4 + ARCH.small_params * 3 // 4)
    # The 16-bit partition only: without offload DeepSpeed drops its init-time fp32 gradient buffer
    # and flattens the partition into a new fp32 tensor at the step instead.
    assert p.gradients == 2 * P // 4
    assert p.step_temporaries >= 4 * P // 4 + 2 * 4 * P // 4  # that fp32 copy + AdamW's two temporaries
    assert p.optimizer_states == 12 * P // 4


def test_zero3_fp32_clones_its_master_partition():
    # DeepSpeed 0.19.8 compares a torch.device with a str to decide whether an fp32 partition can be
    # its own master: never equal, so ZeRO-3 keeps an fp32 clone in fp32 too (measured on CPU).
    from deepspeed.accelerator import get_accelerator

    assert torch.zeros(1).device != get_accelerator().current_device_name()  # the comparison it makes
    p = _plan("train.zero_stage=3", "train.precision=fp32", "train.num_workers=4")
    assert p.optimizer_states == 12 * P // 4
    assert p.gradients == 4 * P // 4


def test_zero3_offload_keeps_the_fp32_gradient_buffer_and_no_step_copy():
    cpu = _plan("train.zero_stage=3", "train.precision=bf16", "train.num_workers=4", "train.offload_optimizer=true")
    assert cpu.gradients == 2 * P // 4 + 4 * P // 4  # on a CPU-only run the host is the device
    plain = _plan("train.zero_stage=3", "train.precision=bf16", "train.num_workers=4")
    assert cpu.step_temporaries == plain.step_temporaries - 4 * P // 4  # no flattened fp32 copy


def test_backward_only_buffers_are_not_counted_at_the_step_on_gpu():
    # ZeRO-1/2 allocate the reduce bucket at backward's first gradient and release it at backward's
    # end; ZeRO-3 releases its gathered parameters by then: neither coexists with the step.
    z2 = _plan("train.zero_stage=2", "train.precision=bf16", "train.num_workers=4", "train.use_gpu=true")
    assert z2.backward_buffers == z2.buffers == 2 * mp.REDUCE_BUCKET_SIZE and z2.late_gradients == 0
    assert z2.total == z2.model_states + max(z2.activations + z2.logits + z2.buffers, z2.step_temporaries)
    z3 = _plan("train.zero_stage=3", "train.precision=bf16", "train.num_workers=4", "train.use_gpu=true")
    assert z3.buffers - z3.backward_buffers == 2 * mp.REDUCE_BUCKET_SIZE  # ZeRO-3's bucket lives from init on
    assert z3.total == (z3.model_states + 2 * mp.REDUCE_BUCKET_SIZE
                        + max(z3.activations + z3.logits + z3.backward_buffers, z3.step_temporaries))


def test_cpu_gradients_are_written_after_the_activation_peak():
    # On CPU ZeRO-0-2's gradients (and ZeRO-1/2's bucket) become resident as backward writes them,
    # while it frees the activations: they count with backward's end and the step only.
    for stage in (0, 2):
        p = _plan(f"train.zero_stage={stage}", "train.precision=fp32", "train.num_workers=1", "train.batch_size=64")
        bucket = p.backward_buffers
        assert p.late_gradients == p.gradients + bucket and p.gradients == 4 * P
        assert p.total == (p.model_states - p.gradients
                           + max(p.activations + p.logits, p.gradients + bucket, p.gradients + p.step_temporaries))
        gpu = _plan(f"train.zero_stage={stage}", "train.precision=fp32", "train.num_workers=1", "train.batch_size=64",
                    "train.use_gpu=true")
        assert gpu.late_gradients == 0
    z3 = _plan("train.zero_stage=3", "train.precision=fp32", "train.num_workers=1")
    assert z3.late_gradients == 0  # zero-filled at init: resident from then on


def test_reduce_bucket_is_whole_on_a_gpu():
    p = _plan("train.zero_stage=2", "train.precision=bf16", "train.num_workers=4", "train.use_gpu=true")
    gathered = 0
    assert p.buffers - gathered == 2 * mp.REDUCE_BUCKET_SIZE


def test_offload_moves_optimizer_states_to_host_on_gpu_only():
    on_gpu = _plan("train.zero_stage=3", "train.precision=bf16", "train.num_workers=4", "train.use_gpu=true",
                   "train.offload_optimizer=true")
    assert on_gpu.optimizer_states == 0 and on_gpu.gradients == 0
    assert on_gpu.host_offload == (12 + 2 + 4) * P // 4
    assert on_gpu.parameters == 2 * (P // 4 + ARCH.small_params * 3 // 4)
    on_cpu = _plan("train.zero_stage=3", "train.precision=bf16", "train.num_workers=4", "train.offload_optimizer=true")
    assert on_cpu.optimizer_states == 12 * P // 4 and on_cpu.host_offload == 0  # host memory is the device


def test_lora_trains_only_the_adapters():
    lora = mp.Lora(r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    trainable = 2 * 2 * 4 * (64 + 64)  # 2 layers x 2 targeted linears x r * (in + out)
    p = _plan("train.zero_stage=2", "train.precision=bf16", "train.num_workers=4", lora=lora)
    assert p.trainable_params == trainable
    assert p.parameters == 2 * (P + trainable)  # the frozen base stays, in bf16
    assert (p.gradients, p.optimizer_states) == (2 * trainable // 4, 12 * trainable // 4)
    full = _plan("train.zero_stage=2", "train.precision=bf16", "train.num_workers=4")
    assert p.total < full.total


def test_separate_towers_and_projection_count():
    p = _plan("train.zero_stage=0", "model.separate_towers=true", "model.projection_dim=32")
    assert p.trainable_params == 2 * P + 64 * 32


def test_gradient_checkpointing_shrinks_activations():
    plain = _plan("train.batch_size=32")
    ckpt = _plan("train.batch_size=32", checkpointing=True)
    assert ckpt.activations == plain.activations_checkpointed < plain.activations == plain.activations_plain
    assert ckpt.total < plain.total


def test_activations_scale_with_the_micro_batch_and_logits_with_the_contrastive_batch():
    small = _plan("train.batch_size=8", "train.contrastive_batch=64", "train.num_workers=4")
    big = _plan("train.batch_size=64", "train.num_workers=4")
    assert big.activations > 7 * small.activations
    assert small.logits >= 64 * 64 * 4 * 4  # 64 rows x 256 gathered columns, fp32


def test_deepspeed_zero3_estimator_agrees_on_model_states():
    """DeepSpeed's estimate (16-bit params, no offload): 18 B/param / GPUs + 4 B x largest layer.
    Ours is 16 B/param / GPUs (the init-time fp32 gradient buffer is dropped again without offload;
    its fp32 copy at the step is a step temporary); within 15%."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    big = dataclasses.replace(ARCH, params=1_500_000_000, largest_module=150_000_000, small_params=2_000_000)
    for n in (2, 8, 64):
        p = _plan("train.zero_stage=3", "train.precision=bf16", f"train.num_workers={n}", "train.use_gpu=true", arch=big)
        _, gpu, largest = estimate_zero3_model_states_mem_needs(big.params, big.largest_module, num_gpus_per_node=n,
                                                                 cpu_offload=False)
        ours = p.model_states + 2 * 2 * big.largest_module  # + the gathered largest layer and its gradient
        assert 0.85 < ours / gpu < 1.15, (n, ours / gpu)


def test_deepspeed_zero2_estimator_agrees_on_model_states():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    big = dataclasses.replace(ARCH, params=1_500_000_000)
    for n in (2, 8):
        p = _plan("train.zero_stage=2", "train.precision=bf16", f"train.num_workers={n}", "train.use_gpu=true", arch=big)
        _, gpu = estimate_zero2_model_states_mem_needs(big.params, num_gpus_per_node=n, cpu_offload=False)
        # DeepSpeed also counts the fp32 gradients of the step (4 B / GPUs), ours as a step temporary.
        assert 0.85 < (p.model_states + 4 * big.params // n) / gpu < 1.15


def _saved_bytes(model: torch.nn.Module, rows: int, seq: int, vocab: int) -> int:
    """Bytes of the tensors autograd saved for backward (parameters excluded), walking the graph."""
    ids = torch.randint(5, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    stack, visited = [out.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in visited:
            continue
        visited.add(f)
        for name in dir(f):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(f, name)
            except RuntimeError:
                continue
            for t in value if isinstance(value, tuple | list) else [value]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st.data_ptr() not in params:
                        seen[st.data_ptr()] = st.nbytes()
        stack.extend(nf for nf, _ in f.next_functions)
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["bert", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_activations_match_what_autograd_saves(kind, dtype):
    from transformers import AutoModel, BertConfig, Qwen2Config, Qwen3Config

    def config(layers: int):  # noqa: ANN202
        if kind == "bert":
            return BertConfig(hidden_size=128, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=512, vocab_size=1000)
        cls = Qwen2Config if kind == "qwen2" else Qwen3Config
        return cls(hidden_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   intermediate_size=384, vocab_size=1000, layer_types=["full_attention"] * layers)

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        kw = {"add_pooling_layer": False} if kind == "bert" else {}
        model = AutoModel.from_config(config(layers), **kw).to(dtype).train()
        return _saved_bytes(model, 4, 32, 1000)

    per_layer = (saved(3) - saved(1)) / 2
    planned = mp.layer_activation_bytes(mp.describe_config(config(1)), 4, 32, 4 if dtype == torch.float32 else 2, gpu=False)
    assert 0.9 < planned / per_layer < 1.1, (planned, per_layer)


def test_describe_config_counts_a_bert():
    from transformers import BertConfig

    a = mp.describe_config(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=1000))
    layer = 4 * (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64) + 2 * 2 * 64
    embeddings = 1000 * 64 + 512 * 64 + 2 * 64 + 2 * 64
    assert a.kind == "encoder" and a.params == embeddings + 2 * layer
    assert a.largest_module == 1000 * 64
    assert "query" in a.linear_suffixes()


# ---------------------------------------------------------------------------------------------
# check(): refuse / warn / off, and suggestions that really fit.


def _between(fit: mp.MemoryPlan, no_fit: mp.MemoryPlan) -> float:
    """A device size (GiB) the first plan fits in and the second does not."""
    assert fit.total < no_fit.total
    return (fit.total + no_fit.total) / 2 / mp.HEADROOM / mp.GIB


def test_refuses_and_names_zero3_which_fits():
    base = ("train.zero_stage=0", "train.precision=fp32", "train.num_workers=8", "train.batch_size=2",
            "model.max_query_tokens=8", "model.max_item_tokens=8")
    big = dataclasses.replace(ARCH, params=50_000_000, largest_module=1_000_000)
    gib = _between(_plan(*base, "train.zero_stage=3", arch=big), _plan(*base, arch=big))
    cfg = _cfg(*base, f"train.device_memory_gib={gib}")
    with pytest.raises(mp.MemoryPlanDoesNotFit) as err:
        mp.check(cfg, big)
    assert isinstance(err.value, ValueError)
    assert "train.zero_stage=3" in str(err.value) and "train.zero_stage=3" in err.value.suggestions
    assert mp.plan(_cfg(*base, f"train.device_memory_gib={gib}", "train.zero_stage=3"), big).fits


def test_refuses_and_names_a_micro_batch_that_fits():
    base = ("train.zero_stage=2", "train.num_workers=1", "train.batch_size=64", "model.max_query_tokens=128",
            "model.max_item_tokens=128")
    gib = _between(_plan(*base[:2], "train.batch_size=8", "train.contrastive_batch=64", *base[3:]), _plan(*base))
    cfg = _cfg(*base, f"train.device_memory_gib={gib}")
    with pytest.raises(mp.MemoryPlanDoesNotFit) as err:
        mp.check(cfg, ARCH)
    m = re.search(r"train\.batch_size=(\d+) with train\.contrastive_batch=(\d+)", str(err.value))
    assert m, str(err.value)
    assert int(m[2]) == 64 and int(m[1]) >= 8
    fixed = _cfg(*base, f"train.device_memory_gib={gib}", f"train.batch_size={m[1]}", f"train.contrastive_batch={m[2]}")
    assert mp.plan(fixed, ARCH).fits


def test_lora_is_suggested_when_only_it_fits():
    base = ("train.zero_stage=0", "train.precision=bf16", "train.num_workers=1", "train.batch_size=1",
            "model.max_query_tokens=4", "model.max_item_tokens=4", "train.use_gpu=true")
    big = dataclasses.replace(ARCH, params=100_000_000)
    s = mp.settings_of(_cfg(*base), big)
    lora = mp._plan(dataclasses.replace(s, lora=mp._default_lora(big)))
    gib = _between(lora, mp._plan(s))
    with pytest.raises(mp.MemoryPlanDoesNotFit) as err:
        mp.check(_cfg(*base, f"train.device_memory_gib={gib}"), big)
    assert "model.lora={r: 16" in str(err.value)


def test_nothing_fits_says_so():
    cfg = _cfg("train.device_memory_gib=0.0001", "train.num_workers=1")
    with pytest.raises(mp.MemoryPlanDoesNotFit, match="no combination"):
        mp.check(cfg, ARCH)


def test_warn_mode_logs_and_returns(caplog):
    cfg = _cfg("train.device_memory_gib=0.0001", "train.memory_check=warn")
    with caplog.at_level(logging.INFO, logger="recsys.memory_plan"):
        p = mp.check(cfg, ARCH)
    assert p.fits is False
    assert any(r.levelno == logging.WARNING and "needs" in r.getMessage() for r in caplog.records)
    assert any("memory plan per device" in r.getMessage() for r in caplog.records)


def test_off_mode_neither_logs_nor_raises(caplog):
    cfg = _cfg("train.device_memory_gib=0.0001", "train.memory_check=off")
    with caplog.at_level(logging.INFO, logger="recsys.memory_plan"):
        mp.check(cfg, ARCH)
    assert not caplog.records


def test_fitting_run_passes_and_the_table_says_so():
    p = mp.check(_cfg(), ARCH)
    assert p.fits
    text = p.table()
    for part in ("parameters", "gradients", "optimizer states", "activations", "loss logits", "peak (total)", "fits"):
        assert part in text


def test_unknown_gpu_memory_is_not_checked(caplog):
    cfg = load_config(None, ["train.use_gpu=true"])
    if torch.cuda.is_available():
        pytest.skip("this process sees a GPU")
    with caplog.at_level(logging.WARNING, logger="recsys.memory_plan"):
        p = mp.check(cfg, ARCH)
    assert p.fits is None and "not checked" in caplog.text


def test_host_ram_is_shared_by_the_workers():
    one = mp.device_memory(load_config(None, ["train.num_workers=1"]))[0]
    two = mp.device_memory(load_config(None, ["train.num_workers=2"]))[0]
    assert one and two and abs(one / 2 - two) <= 1


def test_a_model_the_plan_cannot_read_is_not_checked_but_launches(caplog, tmp_path):
    cfg = _cfg()
    cfg.model.name_or_path = str(tmp_path / "no-such-model")
    with caplog.at_level(logging.WARNING, logger="recsys.memory_plan"):
        assert mp.check(cfg) is None
    assert any("could not read" in r.getMessage() for r in caplog.records)
