"""Loading encoders prints no transformers LOAD REPORT unless something is really wrong.

Exports are saved without BERT's pooler (we pool token states ourselves). Loaded with the
default pooler, each one printed a report of MISSING pooler weights advising to train the
model, once per load (three times in an evaluation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

Captured = tuple[pytest.CaptureFixture[str], pytest.LogCaptureFixture]


@pytest.fixture()
def captured(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Captured:
    """transformers reports through logging (caught by pytest) and its own stderr handler."""
    caplog.set_level("WARNING")
    return capfd, caplog


def _output(c: Captured) -> str:
    return "".join(c[0].readouterr()) + c[1].text


def _bert_with_pooler(path: Path, tokenizer_from: str) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg, add_pooling_layer=True).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_pooler_less_checkpoint_loads_without_a_report(tiny_model: str, captured: Captured) -> None:
    from recsys.encoder import TextEncoder

    _output(captured)
    captured[1].clear()
    enc = TextEncoder(tiny_model)  # saved without a pooler, like every export
    out = _output(captured)
    assert "LOAD REPORT" not in out and "MISSING" not in out, out
    assert getattr(enc.query_model, "pooler", None) is None, "no randomly initialised pooler either"


def test_checkpoint_with_a_pooler_loads_it_without_a_report(tiny_model: str, tmp_path: Path, captured: Captured) -> None:
    from recsys.encoder import TextEncoder

    path = _bert_with_pooler(tmp_path / "with-pooler", tiny_model)
    _output(captured)
    captured[1].clear()
    enc = TextEncoder(path)
    out = _output(captured)
    assert "LOAD REPORT" not in out, out
    assert enc.query_model.pooler is not None


def test_a_real_missing_weight_is_still_reported(tiny_model: str, tmp_path: Path, captured: Captured) -> None:
    """Nothing is silenced: a checkpoint that really lacks weights still gets its report."""
    import shutil

    from safetensors.torch import load_file, save_file

    from recsys.encoder import TextEncoder

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["embeddings.LayerNorm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    _output(captured)
    captured[1].clear()
    TextEncoder(str(broken))
    out = _output(captured)
    assert "LOAD REPORT" in out and "embeddings.LayerNorm.weight" in out and "MISSING" in out


def test_training_load_drops_the_pooler_without_a_report(captured: Captured) -> None:
    """What training needs (no parameters without gradients), from a checkpoint that has a
    pooler (the bundled MiniLM): loaded quietly, then dropped."""
    from recsys.encoder import bundled_model_path, load_hf_encoder

    _output(captured)
    captured[1].clear()
    model = load_hf_encoder(bundled_model_path(), keep_pooler=False)
    out = _output(captured)
    assert "LOAD REPORT" not in out, out
    assert model.pooler is None
    assert not any(name.startswith("pooler.") for name, _ in model.named_parameters())
    hidden = model(input_ids=torch.tensor([[101, 2000, 102]])).last_hidden_state
    assert hidden.shape == (1, 3, 384)
