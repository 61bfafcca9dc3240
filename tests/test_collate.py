"""Batch featurisation: tokenising in the worker and in the Ray Data pipeline give the same tensors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from recsys.config import Config
from recsys.model import load_tokenizer
from recsys.schemas import ITEMS_SCHEMA
from recsys.train import Featurize, ItemTable, collate, features, to_tensors


def _items() -> ItemTable:
    rows = [
        ("A", "Stridex Lightweight Running Shoe - Red", 3),
        ("B", "Brewmont Glass French Press with a very long description " * 4, 0),
        ("C", "Pawsome Memory Foam Dog Bed", 9),
    ]
    return ItemTable(pa.Table.from_pylist(
        [{"item_id": i, "title": t, "brand": None, "category": None, "price": None, "text": t, "dup_group": n, "popularity": p}
         for n, (i, t, p) in enumerate(rows)],
        schema=ITEMS_SCHEMA,
    ))


def _batch() -> dict[str, np.ndarray]:
    return {
        "query": np.array(["running shoes", None, "dog bed"], dtype=object),
        "history": np.array([np.array(["B"]), np.array(["A", "C", "unknown"]), None], dtype=object),
        "item_id": np.array(["A", "B", "C"], dtype=object),
        "weight": np.array([1.0, 3.0, 2.0]),
    }


def test_collate_pads_like_the_tokenizer(tiny_model: str) -> None:
    cfg = Config()
    cfg.model.name_or_path = tiny_model
    cfg.model.max_item_tokens = 8
    tok = load_tokenizer(cfg.model)
    items = _items()
    b = collate(_batch(), items, tok, cfg)
    f = features(_batch(), items, tok, cfg)
    ref_d = tok([items.texts[i] for i in (0, 1, 2)], padding=True, truncation=True, max_length=8, return_tensors="pt")
    assert torch.equal(b["d_ids"], ref_d["input_ids"]) and torch.equal(b["d_mask"], ref_d["attention_mask"])
    assert b["q_ids"].shape == (3, max(len(ids) for ids in f["q_ids"]))
    for row, ids in zip(b["q_ids"], f["q_ids"], strict=True):
        assert row[: len(ids)].tolist() == ids and (row[len(ids):] == tok.pad_token_id).all()
    assert b["history_keys"].shape == (3, 2) and (b["history_keys"][2] == -1).all()  # unknown ids dropped
    assert b["weights"].tolist() == [1.0, 3.0, 2.0]


def test_pipeline_features_round_trip_to_the_same_tensors(tiny_model: str) -> None:
    """Featurize's arrow output, as Ray Data hands it back in numpy batches, pads to what collate gives."""
    cfg = Config()
    cfg.model.name_or_path = tiny_model
    tok = load_tokenizer(cfg.model)
    items = _items()
    actor = Featurize.__new__(Featurize)  # its __init__ only loads these three from storage
    actor.cfg, actor.items, actor.tokenizer = cfg, items, tok
    table = actor(_batch())
    as_numpy = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    got = to_tensors(as_numpy, tok.pad_token_id)
    want = collate(_batch(), items, tok, cfg)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
