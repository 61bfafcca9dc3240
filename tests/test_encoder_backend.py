"""The ONNX encoder backends (recsys.encoder ENCODER_BACKENDS): the torch vectors up to
numerical error (fp32) or quantisation (int8), the model's identity unchanged, the ONNX files
made once and remade when the model under them changes, bad names refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.config import ModelConfig
from recsys.encoder import ONNX_DIR, ONNX_STAMP, TextEncoder, make_tiny_bert

# Different lengths in one batch: padding and the attention mask take part.
TEXTS = [
    "Stridex Lightweight Running Shoe - Red",
    "dog bed",
    "Brewmont French Press, glass, 1 litre, with a spare filter and a long description " * 4,
    "x",
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture()
def model_dir(tiny_model: str, tmp_path: Path) -> str:
    """A private copy of the tiny BERT: the ONNX files go inside it."""
    return str(shutil.copytree(tiny_model, tmp_path / "model"))


def _export(tiny_model: str, out: Path, pooling: str, separate: bool, proj: int) -> str:
    from recsys.model import build_two_tower, export_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=tiny_model, pooling=pooling, separate_towers=separate, projection_dim=proj,
                       max_item_tokens=16, max_query_tokens=24, query_prefix="query: ", item_prefix="item: ")
    torch.manual_seed(0)
    model = build_two_tower(mcfg).eval()
    if separate:  # towers that differ, as after training
        with torch.no_grad():
            for p in model.item_encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return export_model(model, load_tokenizer(mcfg), mcfg, {"model": {"name_or_path": tiny_model}}, out)


@pytest.mark.parametrize("pooling,separate,proj", [("mean", False, 0), ("cls", True, 16)])
def test_onnx_matches_torch_and_keeps_the_identity(tiny_model: str, tmp_path: Path, pooling: str, separate: bool, proj: int) -> None:
    """Exports with every setting the encoder applies around the towers (prefixes, truncation
    below the texts' length, pooling, a projection, separate towers)."""
    export = _export(tiny_model, tmp_path / "export", pooling, separate, proj)
    ref = TextEncoder(export)
    onnx = TextEncoder(export, backend="onnx")
    assert onnx.backend == "onnx" and ref.backend == "torch"
    assert onnx.model_id == ref.model_id
    assert onnx.dim == ref.dim == (proj or 32)
    expected = {"query", "item"} if separate else {"encoder"}
    assert set(onnx.onnx_files) == expected
    assert all(f.parent == Path(export) / ONNX_DIR for f in onnx.onnx_files.values())
    for encode in ("encode_queries", "encode_items"):
        want = getattr(ref, encode)(TEXTS)
        for batch_size in (64, 1):
            got = getattr(onnx, encode)(TEXTS, batch_size=batch_size)
            assert got.shape == want.shape and got.dtype == np.float32
            assert np.abs(got - want).max() < 1e-5, (encode, batch_size, np.abs(got - want).max())
            assert _cos(got, want).min() > 0.9999
    if separate:  # each tower ran its own graph
        assert not np.allclose(onnx.encode_queries(TEXTS), onnx.encode_items(TEXTS), atol=1e-3)


def test_int8_is_close_to_torch_but_not_equal(model_dir: str) -> None:
    ref = TextEncoder(model_dir)
    int8 = TextEncoder(model_dir, backend="onnx-int8")
    assert int8.backend == "onnx-int8" and int8.model_id == ref.model_id
    (name,) = int8.onnx_files
    assert ".int8" in int8.onnx_files[name].name
    for encode in ("encode_queries", "encode_items"):
        want, got = getattr(ref, encode)(TEXTS), getattr(int8, encode)(TEXTS)
        assert _cos(got, want).min() > 0.99
        assert np.abs(got - want).max() > 1e-5, "quantised weights give other vectors than fp32"


def test_onnx_files_are_made_once(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys.encoder as encoder

    first = TextEncoder(model_dir, backend="onnx-int8")
    files = {p.name: p.stat().st_mtime_ns for p in (Path(model_dir) / ONNX_DIR).glob("*.onnx")}
    assert len(files) == 2  # fp32 + its int8 copy

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again although the files are there")

    monkeypatch.setattr(encoder, "export_onnx", refuse)
    monkeypatch.setattr(encoder, "quantize_onnx", refuse)
    for backend in ("onnx", "onnx-int8"):
        again = TextEncoder(model_dir, backend=backend)
        np.testing.assert_array_equal(again.encode_items(TEXTS), TextEncoder(model_dir, backend=backend).encode_items(TEXTS))
    assert {p.name: p.stat().st_mtime_ns for p in (Path(model_dir) / ONNX_DIR).glob("*.onnx")} == files
    np.testing.assert_array_equal(first.encode_items(TEXTS), TextEncoder(model_dir, backend="onnx-int8").encode_items(TEXTS))


def test_onnx_files_of_an_older_model_are_made_again(model_dir: str, tmp_path: Path) -> None:
    """A model folder overwritten by other weights (a retrain to the same path) must not keep
    serving the graph of the old ones."""
    old = TextEncoder(model_dir, backend="onnx").encode_items(TEXTS)
    other = make_tiny_bert(tmp_path / "other", seed=1)
    shutil.copy(Path(other) / "model.safetensors", Path(model_dir) / "model.safetensors")
    ref = TextEncoder(model_dir)
    new = TextEncoder(model_dir, backend="onnx")
    assert not np.allclose(new.encode_items(TEXTS), old, atol=1e-3)
    np.testing.assert_allclose(new.encode_items(TEXTS), ref.encode_items(TEXTS), atol=1e-5)
    import json

    from recsys.encoder import onnx_key

    assert json.loads((Path(model_dir) / ONNX_DIR / ONNX_STAMP).read_text())["model_id"] == onnx_key(model_dir)


def test_onnx_files_of_an_older_recipe_are_made_again(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import recsys.encoder as encoder

    TextEncoder(model_dir, backend="onnx")
    stamp_file = Path(model_dir) / ONNX_DIR / ONNX_STAMP
    stamp = json.loads(stamp_file.read_text())
    stamp_file.write_text(json.dumps({**stamp, "recipe": encoder.ONNX_RECIPE - 1}))
    calls: list[object] = []
    real = encoder.export_onnx
    monkeypatch.setattr(encoder, "export_onnx", lambda *a: calls.append(a) or real(*a))
    TextEncoder(model_dir, backend="onnx")
    assert len(calls) == 1 and json.loads(stamp_file.read_text())["recipe"] == encoder.ONNX_RECIPE
    TextEncoder(model_dir, backend="onnx")
    assert len(calls) == 1


def test_a_remote_model_keeps_its_onnx_files_in_the_cache(tiny_model: str, s3_storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The downloaded copy is deleted after the load, so its ONNX files go to RECSYS_CACHE,
    under the model's identity, and the next replica start reuses them."""
    import tempfile

    import recsys.encoder as encoder
    from recsys import storage
    from recsys.encoder import onnx_cache_dir, onnx_key, open_encoder

    monkeypatch.setenv("RECSYS_CACHE", str(tmp_path / "cache"))
    uri = storage.join(s3_storage.root, "plain-model")
    storage.upload_dir(tiny_model, uri, s3_storage)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    enc = open_encoder(uri, s3_storage, backend="onnx")
    assert list(scratch.iterdir()) == []
    where = onnx_cache_dir(onnx_key(tiny_model))
    assert where.is_relative_to(tmp_path / "cache") and enc.onnx_files["encoder"] == where / "encoder.onnx"
    assert (where / "encoder.onnx").exists()
    ref = TextEncoder(tiny_model)
    assert enc.model_id == ref.model_id and enc.backend == "onnx"
    np.testing.assert_allclose(enc.encode_queries(TEXTS), ref.encode_queries(TEXTS), atol=1e-5)
    monkeypatch.setattr(encoder, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    open_encoder(uri, s3_storage, backend="onnx")


def test_an_unknown_backend_is_refused_before_loading(tmp_path: Path) -> None:
    from recsys.encoder import open_encoder

    missing = str(tmp_path / "no-model-here")  # would fail differently if loading were tried
    with pytest.raises(ValueError, match=r"encoder backend must be one of torch, onnx, onnx-int8, got 'tensorrt'"):
        TextEncoder(missing, backend="tensorrt")
    with pytest.raises(ValueError, match="encoder backend must be one of"):
        open_encoder("s3://bucket/model", backend="onnx_int8")
    with pytest.raises(ValueError, match="runs on CPU in float32"):
        TextEncoder(missing, backend="onnx", device="cuda")


def test_the_serve_config_key_validates() -> None:
    from recsys.config import ConfigError, ServeArgs, load_config

    assert ServeArgs().encoder_backend == "torch"
    assert ServeArgs(encoder_backend="onnx-int8").encoder_backend == "onnx-int8"
    assert load_config(overrides=["serve.encoder_backend=onnx"]).serve.encoder_backend == "onnx"
    with pytest.raises(ConfigError, match="serve.encoder_backend"):
        load_config(overrides=["serve.encoder_backend=openvino"])
