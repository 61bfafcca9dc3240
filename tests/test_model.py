from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.config import ModelConfig
from recsys.encoder import TextEncoder
from recsys.model import build_two_tower, export_model, load_tokenizer

TEXTS = ["Stridex Lightweight Running Shoe - Red", "Brewmont French Press, glass", "dog bed"]


def _tower_embed(model, tok, texts, max_len, item=True):
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        f = model.encode_item if item else model.encode_query
        return f(enc["input_ids"], enc["attention_mask"]).numpy()


@pytest.mark.parametrize(
    "pooling,separate,proj", [("mean", False, 0), ("cls", True, 0), ("mean", False, 16)]
)
def test_export_opens_in_sentence_transformers_and_matches_towers(tiny_model, tmp_path, pooling, separate, proj) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    mcfg = ModelConfig(name_or_path=tiny_model, pooling=pooling, separate_towers=separate, projection_dim=proj, max_item_tokens=32, max_query_tokens=48)
    torch.manual_seed(0)
    model = build_two_tower(mcfg).eval()
    if separate:  # make the towers differ, as they would after training
        with torch.no_grad():
            for p in model.item_encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
    tok = load_tokenizer(mcfg)
    out = export_model(model, tok, mcfg, {"model": {"name_or_path": tiny_model}}, tmp_path / "export")
    items = _tower_embed(model, tok, TEXTS, 32, item=True)
    queries = _tower_embed(model, tok, TEXTS, 48, item=False)
    assert items.shape == (3, proj or 32)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)

    te = TextEncoder(str(out))
    np.testing.assert_allclose(te.encode_items(TEXTS), items, atol=1e-5)
    np.testing.assert_allclose(te.encode_queries(TEXTS), queries, atol=1e-5)

    st_dir = out / "item" if separate else out
    st = SentenceTransformer(str(st_dir), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, convert_to_numpy=True), items, atol=1e-5)
    AutoModel.from_pretrained(str(st_dir))  # plain transformers opens it
    if separate:
        assert not np.allclose(items, queries, atol=1e-3)


def test_bundled_minilm_shared_tower_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    from recsys.encoder import bundled_model_path

    mcfg = ModelConfig(name_or_path="bundled", max_item_tokens=64)
    model = build_two_tower(mcfg).eval()
    ours = _tower_embed(model, load_tokenizer(mcfg), TEXTS, 64)
    ref = SentenceTransformer(bundled_model_path(), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
