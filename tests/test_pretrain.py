"""Domain-adaptive pretraining (recsys/pretrain.py): a 2-worker Ray Train + DeepSpeed masked-LM run
on a tiny BERT over a tiny prepared shop on the real S3 server; its output is the encoder train reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys import paths, storage
from recsys.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(ray_cluster, s3_server, tiny_model):
    from recsys.data import prepare

    cfg = load_config(REPO / "jobs/configs/train_tiny.yaml", [f"model.name_or_path={tiny_model}"])
    cfg.storage = s3_server.storage_config("s3://test/pretrain")
    prepare.run(cfg)
    return cfg


def _cfg(prepared, **pretrain):
    p = type(prepared.pretrain)(**{**prepared.pretrain.model_dump(), "batch_size": 8, "max_tokens": 32, "lr": 1e-2,
                                   "warmup": 1, "log_every": 1, **pretrain})
    return prepared.model_copy(update={"pretrain": p})


def _mean(rows, sl):
    return float(np.mean([r["loss"] for r in rows[sl]]))


# ~2 min (prepare + a 2-worker fit): slow; the masking, sources and config checks run by default.
@pytest.mark.ray
@pytest.mark.slow
def test_mlm_loss_falls_and_the_output_is_the_encoder_train_reads(prepared, tmp_path) -> None:
    from safetensors import safe_open
    from transformers import AutoModel

    from recsys import pretrain
    from recsys.model import build_two_tower

    cfg = _cfg(prepared, steps=12, checkpoint_every=12, run_name="mlm")
    # Only the training split's queries and histories are read, never valid / test.
    used = [f for files in pretrain.corpus_uris(cfg).values() for f in files]
    assert used and all("/train/" in f or f.startswith(paths.items(cfg)) for f in used), used
    assert not any(("/valid/" in f or "/test/" in f) for f in (u[len(cfg.storage.root):] for u in used))  # the bucket is "test"

    summary = pretrain.run(cfg)
    rows = pretrain.read_metrics(cfg)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert _mean(rows, slice(-3, None)) < _mean(rows, slice(0, 3)) - 0.5, [r["loss"] for r in rows]
    assert set(summary["corpus"]) == {"items", "queries", "histories"} and all(v > 0 for v in summary["corpus"].values())
    assert rows[-1]["tokens_total"] == sum(r["tokens"] for r in rows) > 0

    out = summary["output"]
    assert out == paths.pretrained(cfg) and out.startswith("s3://")
    local = storage.download_dir(out, tmp_path / "pretrained", cfg.storage)
    meta = json.loads((local / pretrain.META_FILE).read_text())
    assert meta["steps"] == 12 and meta["initialised_head_weights"], "the tiny BertModel has no MLM head: it was initialised"
    names = set()
    for f in local.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    assert names and not any(n.startswith("cls.") for n in names), "the MLM head is not part of the output"
    # Every weight of the encoder is there; only the (never used) pooler is absent, as in an export.
    model, info = AutoModel.from_pretrained(str(local), output_loading_info=True)
    assert not info["unexpected_keys"] and all(k.startswith("pooler.") for k in info["missing_keys"]), info
    base = AutoModel.from_pretrained(cfg.model.name_or_path)
    w, w0 = model.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight
    assert not torch.allclose(w, w0), "pretraining changed the encoder"
    # As model.name_or_path (the S3 URI itself, as the pipeline chains it): the two towers load it.
    towers = build_two_tower(cfg.model.model_copy(update={"name_or_path": out}))
    torch.testing.assert_close(towers.query_encoder.embeddings.word_embeddings.weight, w)


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_resumes_from_the_checkpoint_and_continues_the_step_count(prepared) -> None:
    from recsys import pretrain

    # warmup 6: the learning rate of steps 1-6 does not depend on the budget (4 or 6 steps), so the
    # resumed run's losses can be compared with an uninterrupted run's at every step.
    pretrain.run(_cfg(prepared, steps=4, checkpoint_every=2, warmup=6, run_name="mlm-resume"))
    cfg = _cfg(prepared, steps=6, checkpoint_every=2, warmup=6, run_name="mlm-resume")
    summary = pretrain.run(cfg)
    rows = pretrain.read_metrics(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["start_step"] for r in rows] == [0, 0, 0, 0, 4, 4]
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    # A resumed run reads what an uninterrupted one reads, at every step (the corpus order is a
    # seeded hash of the texts, not Ray's block completion order)...
    ref_cfg = _cfg(prepared, steps=6, checkpoint_every=6, warmup=6, run_name="mlm-resume-ref")
    pretrain.run(ref_cfg)
    ref = pretrain.read_metrics(ref_cfg)
    assert [r["batch_hash"] for r in rows] == [r["batch_hash"] for r in ref], "the same texts at every step"
    assert len({r["batch_hash"] for r in ref}) == 6
    # ... and masks, dropout and initialisation are seeded, and the optimizer's state is resumed:
    # the same losses at every step, the two after the resume included.
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-4)


# ~2-3 min (two fits): slow.
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_a_pretrain_resumes_with_another_worker_count(prepared, stage) -> None:
    """Issue 18: a pretrain checkpointed by 2 workers and re-run with 1 finishes: the checkpoint
    records its worker count, ZeRO's partitions are re-cut from DeepSpeed's universal
    checkpoint, and the stream walks past the texts the two workers consumed. Before,
    DeepSpeed refused the ZeRO checkpoint of another data-parallel size."""
    from recsys import pretrain

    train = prepared.train.model_copy(update={"zero_stage": stage})
    two = _cfg(prepared, steps=4, checkpoint_every=2, warmup=1, run_name=f"mlm-regrid{stage}", num_workers=2)
    pretrain.run(two.model_copy(update={"train": train}))
    one = _cfg(prepared, steps=6, checkpoint_every=2, warmup=1, run_name=f"mlm-regrid{stage}", num_workers=1)
    summary = pretrain.run(one.model_copy(update={"train": train}))
    rows = pretrain.read_metrics(one)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and summary["resumed_from_step"] == 4
    assert [r["start_step"] for r in rows] == [0, 0, 0, 0, 4, 4]
    # The new shard is the whole corpus: it walks past texts the two workers consumed in the open
    # epoch as it meets them (which texts: tests/test_stream.py, exactly).
    walked = [r["skipped_rows"] for r in rows]
    assert walked[:4] == [0] * 4 and 0 < walked[4] <= walked[5] <= 2 * 4 * two.pretrain.batch_size, walked
    assert all(np.isfinite(r["loss"]) for r in rows)
    # The learning rate goes on along the checkpoint's schedule (linear decay to step 6).
    assert rows[4]["lr"] == pytest.approx(one.pretrain.lr * (6 - 5) / (6 - 1), rel=1e-6), rows[4]


@pytest.mark.ray
@pytest.mark.slow
def test_the_pipeline_chains_pretrain_into_train(prepared) -> None:
    from jobs.pipeline import default_stages, run_stages
    from recsys.encoder import RECSYS_META

    cfg = _cfg(prepared, enabled=True, steps=2, checkpoint_every=2, run_name="mlm-chain")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 2, "checkpoint_every": 2, "run_name": "after-mlm"})})
    assert default_stages(cfg)[:3] == ["prepare", "pretrain", "train"]
    summary = run_stages(cfg, ["pretrain", "train"])
    assert summary["stages"]["train"]["result"]["steps"] == 2
    export_meta = storage.read_json(storage.join(paths.export_dir(cfg), RECSYS_META), cfg.storage)
    assert export_meta["base_model"] == paths.pretrained(cfg), export_meta


def test_the_pipeline_refuses_to_chain_a_missing_pretrained_encoder(tmp_path) -> None:
    from jobs.pipeline import chain_pretrained, default_stages

    cfg = load_config(None, [f"storage.root={tmp_path}", "pretrain.enabled=true"])
    with pytest.raises(FileNotFoundError, match=r"pretrain.enabled=true but there is no adapted encoder at .*pretrain/model"):
        chain_pretrained(cfg)
    assert "pretrain" not in default_stages(load_config(None, []))


def test_the_pipeline_refuses_an_adapted_encoder_made_from_another_base_model(tmp_path) -> None:
    from jobs.pipeline import chain_pretrained
    from recsys.pretrain import META_FILE

    cfg = load_config(None, [f"storage.root={tmp_path}", "pretrain.enabled=true", "model.name_or_path=bundled"])
    meta = storage.join(paths.pretrained(cfg), META_FILE)
    storage.write_bytes(meta, json.dumps({"base_model": "bert-base-uncased"}).encode(), cfg.storage)
    with pytest.raises(ValueError, match=r"pretrained from 'bert-base-uncased', not model.name_or_path='bundled'"):
        chain_pretrained(cfg)
    storage.write_bytes(meta, json.dumps({"base_model": "bundled"}).encode(), cfg.storage)
    assert chain_pretrained(cfg).model.name_or_path == paths.pretrained(cfg)


def test_masks_are_seeded_and_follow_mlm_probability(tiny_model) -> None:
    from transformers import AutoTokenizer

    from recsys.pretrain import _Masker

    cfg = load_config(None, [f"model.name_or_path={tiny_model}", "pretrain.mlm_probability=0.3", "pretrain.max_tokens=64"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["cordless drill 18v lithium ion with two batteries and a carrying case"] * 64
    a, b, c = _Masker(tok, cfg)(texts, seed=1), _Masker(tok, cfg)(texts, seed=1), _Masker(tok, cfg)(texts, seed=2)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])
    chosen = a["labels"] != -100
    share = chosen.sum().item() / (a["attention_mask"].sum().item() - 2 * len(texts))  # [CLS] and [SEP] are never masked
    assert 0.25 < share < 0.35, share
    assert not chosen[:, 0].any(), "special tokens are never masked"
    wwm = load_config(None, [f"model.name_or_path={tiny_model}", "pretrain.whole_word_mask=true"])
    assert (_Masker(tok, wwm)(["unbelievably comfortable"] * 8, seed=0)["labels"] != -100).any()


@pytest.mark.parametrize("override, message", [
    ("pretrain.mlm_probability=0", "pretrain.mlm_probability: Input should be greater than 0"),
    ("pretrain.mlm_probability=1.5", "pretrain.mlm_probability: Input should be less than 1"),
    ("pretrain.steps=0", "pretrain.steps: Input should be greater than or equal to 1"),
    ("pretrain.max_tokens=4", "pretrain.max_tokens: Input should be greater than or equal to 8"),
    ("pretrain.sources=[items,items]", "names a source twice"),
    ("pretrain.sources=[reviews]", "pretrain.sources[0]: Input should be 'items', 'queries' or 'histories'"),
    ("pretrain.stpes=3", "did you mean pretrain.steps?"),
])
def test_bad_pretrain_settings_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value), str(e.value)
