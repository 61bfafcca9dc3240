"""Issue 20: decoder-only embedders (last-token pooling, left padding, EOS), LoRA through peft
under DeepSpeed ZeRO-3 (built inside zero.Init), and their export (merged weights that
sentence-transformers opens, and the adapter alone). Tiny randomly initialised Qwen2 / Llama
decoders built in code (`tiny_decoder`, recsys.encoder.make_tiny_decoder)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.config import ConfigError, LoraSettings, ModelConfig, load_config

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Stridex Lightweight Running Shoe - Red", "espresso machine", "a", "kids rain jacket with a hood, navy blue, size 8"]
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0}


def _mcfg(path: str, **kw) -> ModelConfig:
    return ModelConfig(name_or_path=path, pooling="last", max_query_tokens=32, max_item_tokens=32, **kw)


# ---------------------------------------------------------------------------------------------
# Pooling, padding, tokenizer (no Ray)


def test_last_token_pooling_reads_the_last_real_token_with_left_or_right_padding() -> None:
    from recsys.encoder import pool
    from recsys.features import pad_tokens

    rows = [[11, 12, 13], [21], [31, 32]]
    for side in ("left", "right"):
        ids, mask = pad_tokens(rows, 0, side)
        if side == "left":
            assert ids.tolist() == [[11, 12, 13], [0, 0, 21], [0, 31, 32]]
            assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
        hidden = ids.unsqueeze(-1).float().expand(-1, -1, 2)  # each position's state = its token id
        assert pool(hidden, mask, "last")[:, 0].tolist() == [13.0, 21.0, 32.0], side
    with pytest.raises(ValueError, match="'mean', 'cls' or 'last'"):
        pool(hidden, mask, "first")


def test_decoder_tokenizer_gets_pad_eos_and_left_padding_and_keeps_them_when_saved(tiny_decoder, tmp_path) -> None:
    from transformers import AutoTokenizer

    from recsys.model import load_tokenizer

    raw = AutoTokenizer.from_pretrained(tiny_decoder)
    assert raw.pad_token is None and raw("hello world")["input_ids"][-1] != raw.eos_token_id  # what a Qwen2 tokenizer is like
    tok = load_tokenizer(_mcfg(tiny_decoder))
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    for t in [tok, None]:
        if t is None:  # sentence-transformers and TextEncoder reopen a saved copy
            tok.save_pretrained(tmp_path / "tok")
            t = AutoTokenizer.from_pretrained(tmp_path / "tok")
        ids = t(TEXTS)["input_ids"]
        assert all(r[-1] == t.eos_token_id for r in ids)
        cut = t(TEXTS, truncation=True, max_length=3)["input_ids"]  # truncated texts still end with EOS
        assert all(len(r) <= 3 and r[-1] == t.eos_token_id for r in cut)
        batch = t(TEXTS, padding=True, return_tensors="pt")
        assert t.padding_side == "left" and bool((batch["attention_mask"][:, -1] == 1).all())
    # A tokenizer that ends texts with a special token already (BERT's [SEP], like the
    # Qwen3-Embedding tokenizer's <|endoftext|>) is left as it is, also under last pooling.
    bert = load_tokenizer(ModelConfig(name_or_path="bundled", pooling="last"))
    assert bert("hello")["input_ids"] == [101, 7592, 102] and bert.padding_side == "left"
    assert load_tokenizer(ModelConfig(name_or_path="bundled")).padding_side == "right"  # mean pooling: unchanged


def test_llama_tokenizer_keeps_its_bos_and_gets_eos(tmp_path) -> None:
    from recsys.encoder import TextEncoder, make_tiny_decoder
    from recsys.model import load_tokenizer

    path = make_tiny_decoder(tmp_path / "llama", arch="llama")
    tok = load_tokenizer(_mcfg(path))
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 4
    emb = TextEncoder(path, pooling="last").encode_items(TEXTS)
    assert emb.shape == (len(TEXTS), 32) and np.isfinite(emb).all()


def test_a_left_padded_batch_encodes_each_text_as_it_encodes_alone(tiny_decoder) -> None:
    """Padding never reaches the pooled state: the last real token (EOS) is read, and the causal
    mask keeps the pad tokens before it out of its attention (sdpa and eager alike)."""
    from recsys.encoder import TextEncoder

    enc = TextEncoder(tiny_decoder, pooling="last", max_item_tokens=32)
    assert enc.tokenizer.padding_side == "left"
    batch = enc.encode_items(TEXTS)
    alone = np.concatenate([enc.encode_items([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    # ... and it is the EOS token's state: the same text without its EOS pools another vector.
    ids = enc.tokenizer([TEXTS[0]], return_tensors="pt")
    with torch.no_grad():
        hidden = enc.item_model(**ids).last_hidden_state
    eos = torch.nn.functional.normalize(hidden[:, -1], dim=-1).numpy()
    np.testing.assert_allclose(batch[:1], eos, atol=1e-5)


def test_lora_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="model.lora: target_modules .* names a module twice"):
        load_config(None, ["model.lora={target_modules: [q_proj, q_proj]}"])
    with pytest.raises(ConfigError, match="model.lora.r"):
        load_config(None, ["model.lora={r: 0}"])
    cfg = load_config(None, ["model.lora={r: 8}", "model.pooling=last"])
    assert cfg.model.lora == LoraSettings(r=8) and "q_proj" in cfg.model.lora.target_modules


def test_lora_on_modules_the_model_lacks_names_them_and_the_model_s_layers(tiny_model) -> None:
    from recsys.model import build_two_tower

    with pytest.raises(ValueError, match=r"model.lora.target_modules: \['q_proj'.*its linear layers are.*'query'"):
        build_two_tower(ModelConfig(name_or_path=tiny_model, lora=LoraSettings(target_modules=["q_proj", "query"])))


def test_flash_attention_needs_a_gpu(tiny_decoder) -> None:
    from recsys.train import build_towers

    cfg = load_config(None, [f"model.name_or_path={tiny_decoder}", "model.attn_implementation=flash_attention_2"])
    with pytest.raises(ValueError, match="train.use_gpu"):
        build_towers(cfg)


# ---------------------------------------------------------------------------------------------
# Export (no Ray): merged weights + adapter


def _perturb_lora(model, seed: int = 0) -> None:
    """Stand-in for training in the unit test: LoRA B starts at zero, so an untrained adapter
    changes nothing; give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _base_and_adapter(export: Path, base_path: str) -> tuple[dict, dict]:
    """The base model's weights, and the base with the export's adapter merged, by peft alone."""
    from peft import PeftModel
    from transformers import AutoModel

    base = AutoModel.from_pretrained(base_path)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(export / "adapter")).merge_and_unload()
    return base_sd, merged.state_dict()


def _check_export(export: Path, base_path: str, *, lora_targets: list[str]) -> None:
    """The export is a plain model folder: sentence-transformers and TextEncoder give the same
    embeddings; its weights = the base + the exported adapter (the base weights untouched)."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from recsys.encoder import TextEncoder

    assert json.loads((export / "1_Pooling" / "config.json").read_text())["pooling_mode_lasttoken"] is True
    assert not (export / "adapter_config.json").exists() and (export / "adapter" / "adapter_config.json").exists()
    ours = TextEncoder(str(export))
    st = SentenceTransformer(str(export), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), ours.encode_items(TEXTS), atol=1e-5)
    # One shared folder tells sentence-transformers the item length (max_seq_length); queries
    # are read up to max_query_tokens, as TextEncoder reads them.
    st.max_seq_length = ours.max_query_tokens
    q = st.encode(TEXTS, prompt_name="query") if ours.query_prefix else st.encode(TEXTS)
    np.testing.assert_allclose(q, ours.encode_queries(TEXTS), atol=1e-5)
    exported = load_file(str(export / "model.safetensors"))
    base_sd, merged = _base_and_adapter(export, base_path)
    assert set(exported) == set(base_sd)
    changed = []
    for k, w in exported.items():
        np.testing.assert_allclose(w.numpy(), merged[k].numpy(), atol=1e-6, err_msg=k)
        if not torch.equal(w, base_sd[k]):
            changed.append(k)
    # Only the adapted layers' weights differ from the base; embeddings and norms are the base's.
    assert changed and all(k.rsplit(".", 2)[-2] in lora_targets for k in changed), changed


def test_lora_export_merged_and_adapter_open_alike(tiny_decoder, tmp_path) -> None:
    from recsys.encoder import RECSYS_META, TextEncoder
    from recsys.model import build_two_tower, export_model, load_tokenizer

    targets = ["q_proj", "v_proj", "down_proj"]
    mcfg = _mcfg(tiny_decoder, lora=LoraSettings(**LORA, target_modules=targets), projection_dim=8,
                 query_prefix="Instruct: find the product\nQuery:")
    model = build_two_tower(mcfg).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projection") for n in trainable), trainable
    _perturb_lora(model)
    tok = load_tokenizer(mcfg)
    with torch.no_grad():  # the towers as trained, before the export merges them
        enc = tok([mcfg.item_prefix + t for t in TEXTS], padding=True, return_tensors="pt")
        live = model.encode_item(enc["input_ids"], enc["attention_mask"]).numpy()
    out = tmp_path / "export"
    export_model(model, tok, mcfg, {}, out)
    meta = json.loads((out / RECSYS_META).read_text())
    assert meta["pooling"] == "last" and meta["lora"]["target_modules"] == targets and meta["projection_dim"] == 8
    np.testing.assert_allclose(TextEncoder(str(out)).encode_items(TEXTS), live, atol=1e-5)
    _check_export(out, tiny_decoder, lora_targets=targets)
    with pytest.raises(ValueError, match="decoder-only"):
        TextEncoder(str(out), backend="onnx", onnx_dir=tmp_path / "onnx")


def test_an_export_is_read_with_the_padding_side_it_was_trained_with(tiny_decoder, tmp_path) -> None:
    """model.padding_side=right with last-token pooling (allowed, and pooling reads the last real
    token either way): reopening the export must not fall back to "auto" (left)."""
    from recsys.encoder import TextEncoder
    from recsys.model import build_two_tower, export_model, load_tokenizer

    for side in ("right", "left"):
        mcfg = _mcfg(tiny_decoder, padding_side=side)
        tok = load_tokenizer(mcfg)
        assert tok.padding_side == side
        out = tmp_path / side
        export_model(build_two_tower(mcfg).eval(), tok, mcfg, {}, out)
        assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == side
        assert TextEncoder(str(out)).tokenizer.padding_side == side
        # An explicit side given when opening still wins over the export's.
        other = "left" if side == "right" else "right"
        assert TextEncoder(str(out), padding_side=other).tokenizer.padding_side == other


# ---------------------------------------------------------------------------------------------
# ZeRO-3: built inside zero.Init, no rank holds the full weights (2 processes, gloo, no Ray)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _partition_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    import torch.distributed as dist

    from recsys.config import config_from_dict
    from recsys.train import build_towers

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        towers = build_towers(config_from_dict(cfg_dict))
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        rows = [{"name": n, "local": p.numel(), "full": int(getattr(p, "ds_numel", p.numel())),
                 "partition": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else None, "grad": p.requires_grad}
                for n, p in towers.named_parameters()]
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rows": rows, "zero3_after": is_deepspeed_zero3_enabled()}))
    finally:
        dist.destroy_process_group()


def test_zero3_builds_the_model_partitioned_inside_zero_init(tiny_decoder, tmp_path) -> None:
    """Every base weight is a ZeRO-3 partition from the moment it is built (the local tensor is
    empty, the rank's shard is half of it); only the small adapters are whole until
    deepspeed.initialize partitions them too. The zero.Init setting is gone afterwards."""
    import torch.multiprocessing as mp

    cfg = load_config(None, [f"model.name_or_path={tiny_decoder}", "model.pooling=last", f"model.lora={json.dumps(LORA)}",
                             "model.gradient_checkpointing=true", "train.zero_stage=3"])
    mp.start_processes(_partition_worker, args=(2, _free_port(), cfg.model_dump(mode="json"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["zero3_after"] is False
        base = [r for r in got["rows"] if "lora_" not in r["name"]]
        assert base and all(r["local"] == 0 and r["partition"] == -(-r["full"] // 2) for r in base), base[:3]
        assert sum(r["partition"] for r in base) <= sum(r["full"] for r in base) / 2 + len(base)
        assert not any(r["grad"] for r in base) and all(r["grad"] for r in got["rows"] if "lora_" in r["name"])


# ---------------------------------------------------------------------------------------------
# 2 Ray Train workers: LoRA + ZeRO-3 trains, resumes, exports


@pytest.fixture(scope="module")
def prepared_llm(ray_cluster, s3_server, tiny_decoder):
    from recsys.data import prepare

    cfg = load_config(REPO / "jobs/configs/train_tiny.yaml", [
        f"model.name_or_path={tiny_decoder}", "model.pooling=last", "model.attn_implementation=sdpa",
        "model.gradient_checkpointing=true", "model.projection_dim=16",
        f"model.lora={json.dumps({**LORA, 'target_modules': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']})}",
        "model.query_prefix=Instruct: find the product\nQuery:",
        "train.zero_stage=3", "train.lr=5e-3", "train.warmup_steps=1",
    ])
    cfg.storage = s3_server.storage_config("s3://test/llm")
    prepare.run(cfg)
    return cfg


def _train_cfg(prepared, **train):
    return prepared.model_copy(update={"train": type(prepared.train)(**{**prepared.train.model_dump(), **train})})


def _rows(cfg):
    from recsys import paths, storage

    return [json.loads(x) for x in storage.read_bytes(paths.metrics_file(cfg), cfg.storage).decode().splitlines()]


# ~2.5 min (prepare + two 2-worker fits): slow; the 2-process engine test covers LoRA + ZeRO-3
# training and export by default.
@pytest.mark.ray
@pytest.mark.slow
def test_lora_zero3_trains_resumes_and_exports(prepared_llm, tmp_path) -> None:
    """LoRA (every projection of the decoder) + ZeRO-3 (built inside zero.Init) + gradient
    checkpointing + a projection, on 2 workers: the loss falls, a re-submitted run resumes from
    the checkpoint and walks past the consumed batches, the adapters' B weights (zero at the
    start by design) moved and the base weights did not, and the export (merged + adapter)
    gives the same embeddings in TextEncoder and sentence-transformers."""
    from safetensors.torch import load_file

    from recsys import paths, storage, train
    from recsys.encoder import TextEncoder

    first = _train_cfg(prepared_llm, run_name="lora-z3", max_steps=4, checkpoint_every=2)
    train.run(first)
    assert [r["step"] for r in _rows(first)] == [1, 2, 3, 4]
    cfg = _train_cfg(prepared_llm, run_name="lora-z3", max_steps=10, checkpoint_every=5)
    summary = train.run(cfg)
    rows = _rows(cfg)
    assert [r["step"] for r in rows] == list(range(1, 11)) and summary["steps"] == 10
    assert [r["skipped_rows"] for r in rows] == [0] * 4 + [4 * cfg.train.rows_per_batch] * 6  # resumed at step 4
    losses = [r["loss"] for r in rows]
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3]), losses

    out = Path(storage.download_dir(paths.export_dir(cfg), tmp_path / "export", cfg.storage))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert b and all(float(v.abs().max()) > 0 for v in b.values()), "LoRA B weights stayed zero"
    _check_export(out, cfg.model.name_or_path, lora_targets=cfg.model.lora.target_modules)
    dense = load_file(str(out / "2_Dense" / "model.safetensors"))["linear.weight"]
    assert dense.shape == (16, 32)
    # The trained model is not the base one: _check_export found the merged weights = base +
    # the (non-zero) adapters; the export's vectors are the projection's width.
    assert TextEncoder(str(out)).encode_items(TEXTS).shape == (len(TEXTS), 16)


@pytest.mark.ray
@pytest.mark.slow
def test_llama_lora_zero3_bf16_with_the_gradient_cache_trains(prepared_llm, tmp_path) -> None:
    """The Llama architecture in bf16, separate towers, contrastive batches of 8 rows through the
    gradient cache in micro-batches of 4, tokenised in the Ray Data pipeline."""
    from recsys import train
    from recsys.encoder import make_tiny_decoder

    llama = make_tiny_decoder(tmp_path / "llama", arch="llama")
    cfg = _train_cfg(prepared_llm, run_name="lora-llama", max_steps=16, checkpoint_every=16, precision="bf16",
                     batch_size=4, contrastive_batch=8, tokenize_in="pipeline", lr=2e-3)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": llama, "separate_towers": True})})
    train.run(cfg)
    losses = [r["loss"] for r in _rows(cfg)]
    # 8-row batches: one batch's loss is noisy, so the first and last quarters are compared.
    assert len(losses) == 16 and np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:4]), losses


def _engine_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    """One rank of a 2-process LoRA + ZeRO-3 run of recsys.train's engine (no Ray): the same
    `_engine` (built inside zero.Init), `contrastive_step` and `_export` as train_loop_per_worker."""
    import torch.distributed as dist

    from recsys import train
    from recsys.config import config_from_dict
    from recsys.features import pad_tokens
    from recsys.model import load_tokenizer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = config_from_dict(cfg_dict)
        torch.manual_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model)
        module, engine = train._engine(cfg)
        n = cfg.train.batch_size
        words = ["red", "blue", "running", "shoe", "jacket", "espresso", "machine", "kids", "rain", "hood", "steel", "lamp"]
        items = [f"{words[(rank * n + i) % 12]} {words[(3 * i + rank) % 12]} item {rank * n + i}" for i in range(n)]
        queries = [f"{w.split()[0]} {w.split()[-1]}" for w in items]
        q_ids, q_mask = pad_tokens(tok([cfg.model.query_prefix + q for q in queries])["input_ids"], tok.pad_token_id, tok.padding_side)
        d_ids, d_mask = pad_tokens(tok(items)["input_ids"], tok.pad_token_id, tok.padding_side)
        keys = torch.arange(rank * n, (rank + 1) * n, dtype=torch.int64)
        b = {"q_ids": q_ids, "q_mask": q_mask, "d_ids": d_ids, "d_mask": d_mask, "weights": torch.ones(n), "item_keys": keys,
             "dup_keys": keys, "history_keys": torch.full((n, 1), -1, dtype=torch.int64), "group_keys": keys + 1000,
             "logq": torch.zeros(n)}
        losses = [train.contrastive_step(engine, module, b, n) for _ in range(cfg.train.max_steps)]
        # What train.param_groups hands AdamW (and so what has optimizer states): requires_grad only.
        optimized = sum(int(getattr(p, "ds_numel", p.numel())) for g in train.param_groups(module, 0.0) for p in g["params"])
        names = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        train._export(engine, module, tok, cfg, rank)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"losses": losses, "optimized": optimized, "names": names}))
    finally:
        dist.destroy_process_group()


def test_lora_zero3_engine_trains_and_exports_on_two_processes(tiny_decoder, tmp_path) -> None:
    """recsys.train's engine on 2 processes (gloo, no Ray; the Ray run is
    test_lora_zero3_trains_resumes_and_exports): LoRA on every projection + ZeRO-3 + gradient
    checkpointing + a projection. The loss falls, the optimizer holds the adapters and the
    projection only, the adapters' B weights (zero at the start) moved, the base weights did not,
    and the gathered, merged export opens alike in TextEncoder and sentence-transformers."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from recsys import paths

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = load_config(None, [
        f"model.name_or_path={tiny_decoder}", "model.pooling=last", "model.gradient_checkpointing=true",
        "model.attn_implementation=sdpa", "model.projection_dim=16", f"model.lora={json.dumps({**LORA, 'target_modules': targets})}",
        "model.query_prefix=Instruct: find the product\nQuery:", "train.zero_stage=3", "train.lr=5e-3", "train.warmup_steps=1",
        "train.max_steps=12", "train.batch_size=8", f"storage.root={tmp_path / 'root'}", "train.run_name=engine",
    ])
    mp.start_processes(_engine_worker, args=(2, _free_port(), cfg.model_dump(mode="json"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    losses = got[0]["losses"]
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # layers x r x (in + out) of q, k, v, o (k, v: 2 KV heads of 8), gate, up, down; + the projection
    lora_numel = 2 * 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64))
    assert got[0]["optimized"] == lora_numel + 16 * 32, got[0]["optimized"]
    assert all("lora_" in n or n.startswith("towers.projection") for n in got[0]["names"]), got[0]["names"]
    out = Path(paths.export_dir(cfg))
    b = {k: v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert len(b) == 2 * len(targets) and all(float(v.abs().max()) > 0 for v in b.values()), "LoRA B weights stayed zero"
    _check_export(out, tiny_decoder, lora_targets=targets)


def test_lora_zero3_bf16_with_a_projection_trains_on_two_processes(tiny_decoder, tmp_path) -> None:
    """bf16 under ZeRO-3: zero.Init gives from_pretrained's weights bf16, but the projection and
    the adapters are built beside them in fp32, which ZeRO-3 keeps (a bf16 hidden state met an
    fp32 projection weight: "expected m1 and m2 to have the same dtype"). recsys.train._engine
    casts them to the engine's dtype."""
    import torch.multiprocessing as mp

    cfg = load_config(None, [
        f"model.name_or_path={tiny_decoder}", "model.pooling=last", "model.attn_implementation=sdpa", "model.projection_dim=16",
        f"model.lora={json.dumps({**LORA, 'target_modules': ['q_proj', 'v_proj']})}", "train.precision=bf16",
        "train.zero_stage=3", "train.lr=5e-3", "train.warmup_steps=1", "train.max_steps=3", "train.batch_size=8",
        f"storage.root={tmp_path / 'root'}", "train.run_name=engine-bf16",
    ])
    mp.start_processes(_engine_worker, args=(2, _free_port(), cfg.model_dump(mode="json"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert len(got["losses"]) == 3 and np.isfinite(got["losses"]).all(), got["losses"]
