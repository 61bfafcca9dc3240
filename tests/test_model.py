from __future__ import annotations

from pathlib import Path

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
    out = Path(export_model(model, tok, mcfg, {"model": {"name_or_path": tiny_model}}, tmp_path / "export"))
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


def _export(tiny_model: str, out: str, storage_cfg=None, proj: int = 0, perturb: float = 0.0) -> None:
    """Export the tiny BERT as a two-tower model (optionally with a projection or nudged weights,
    as a retraining would)."""
    mcfg = ModelConfig(name_or_path=tiny_model, projection_dim=proj, max_item_tokens=32)
    torch.manual_seed(0)
    model = build_two_tower(mcfg).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    export_model(model, load_tokenizer(mcfg), mcfg, {}, out, storage_cfg)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_reexport_to_the_same_place_leaves_nothing_of_the_old_model(tiny_model, s3_storage, tmp_path, where) -> None:
    """A model retrained without a projection, exported where one with a projection was: no
    projection file survives, and the encoder has no projection (issue 14)."""
    from recsys import storage

    cfg = s3_storage if where == "s3" else None
    uri = storage.join(s3_storage.root, "export") if where == "s3" else str(tmp_path / "export")
    _export(tiny_model, uri, cfg, proj=16)
    assert any(f.endswith("2_Dense/model.safetensors") for f in storage.list_files(uri, cfg))
    _export(tiny_model, uri, cfg, proj=0)
    left = storage.list_files(uri, cfg)
    assert not [f for f in left if "2_Dense" in f or f.endswith("projection.pt")], left
    te = TextEncoder(str(storage.download_dir(uri, tmp_path / "download", cfg)))
    assert te.projection is None and te.dim == 32
    assert te.encode_items(TEXTS).shape == (3, 32)


def test_projection_comes_from_the_metadata_not_a_stray_file(tiny_model, tmp_path) -> None:
    _export(tiny_model, str(tmp_path / "export"), proj=0)
    torch.save(torch.randn(16, 32), tmp_path / "export" / "projection.pt")  # left by some other tool
    assert TextEncoder(str(tmp_path / "export")).projection is None
    _export(tiny_model, str(tmp_path / "with"), proj=16)
    (tmp_path / "with" / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="projection_dim=16"):
        TextEncoder(str(tmp_path / "with"))


def test_model_id_follows_the_weights_not_the_path(tiny_model, tmp_path) -> None:
    import json
    import shutil

    from recsys.encoder import RECSYS_META, local_model_id, make_tiny_bert, model_id_at

    def recorded(path) -> str:
        return json.loads((path / RECSYS_META).read_text())["model_id"]

    a, b = tmp_path / "a", tmp_path / "b"
    _export(tiny_model, str(a))
    first = recorded(a)
    _export(tiny_model, str(b))  # the same weights elsewhere
    _export(tiny_model, str(a))  # and again to the same path
    assert recorded(a) == recorded(b) == first
    assert TextEncoder(str(a)).model_id == model_id_at(str(a)) == first
    _export(tiny_model, str(a), perturb=0.01)  # retrained to the same path
    assert recorded(a) != first and TextEncoder(str(a)).model_id == recorded(a)
    _export(tiny_model, str(b), proj=16)
    assert recorded(b) not in (first, recorded(a))

    # A plain (zero-shot) model: identified by its weight files and the settings it is read with.
    plain = TextEncoder(tiny_model).model_id
    shutil.copytree(tiny_model, tmp_path / "copy")
    assert local_model_id(str(tmp_path / "copy")) == plain == model_id_at(tiny_model)
    assert TextEncoder(make_tiny_bert(tmp_path / "other", seed=1)).model_id != plain
    assert TextEncoder(tiny_model, pooling="cls").model_id != plain


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(tiny_model, tmp_path) -> None:
    """Replacing the destination deletes what was there: only ever a previous export."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="recsys_model.json"):
        _export(tiny_model, str(mine))
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_remote_model_opens_without_leaving_its_download(tiny_model, s3_storage, tmp_path, monkeypatch) -> None:
    """Serve replicas and the batch job open models from s3://: the copy is deleted once
    loaded (a replica that swapped N times used to keep N copies on disk)."""
    import tempfile

    from recsys import storage
    from recsys.encoder import model_id_at, open_encoder

    uri = storage.join(s3_storage.root, "plain-model")
    storage.upload_dir(tiny_model, uri, s3_storage)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    enc = open_encoder(uri, s3_storage)
    assert list(scratch.iterdir()) == []
    ref = TextEncoder(tiny_model)
    np.testing.assert_allclose(enc.encode_items(["red tent"]), ref.encode_items(["red tent"]), atol=1e-6)
    assert enc.model_id == ref.model_id == model_id_at(uri, s3_storage)
