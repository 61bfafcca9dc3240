"""Batch featurisation: tokenising in the worker and in the Ray Data pipeline give the same tensors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.config import Config
from recsys.features import (
    BatchTokens,
    Featurize,
    ItemTokens,
    collate,
    features,
    hard_negatives_for,
    pad_tokens,
    to_tensors,
)
from recsys.items import ItemTable
from recsys.model import load_tokenizer
from recsys.negatives import HardNegatives
from recsys.schemas import ITEMS_SCHEMA


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


def test_rows_of_one_user_or_one_query_share_a_group(tiny_model: str) -> None:
    """Their positives are accidental hits for each other (the loss masks equal group keys)."""
    cfg = Config()
    cfg.model.name_or_path = tiny_model
    batch = {
        "kind": np.array(["next_item", "next_item", "next_item", "search", "search", "search"], dtype=object),
        "user_id": np.array(["u1", "u1", "u2", "u3", "u4", "u4"], dtype=object),
        "query": np.array([None, None, None, "Dog  Bed", "dog bed", "red shoe"], dtype=object),
        "history": np.array([None] * 6, dtype=object),
        "item_id": np.array(["A", "B", "C", "C", "A", "A"], dtype=object),
        "weight": np.ones(6),
    }
    g = collate(batch, _items(), load_tokenizer(cfg.model), cfg)["group_keys"].tolist()
    assert g[0] == g[1] != g[2]  # one user's next items
    assert g[3] == g[4] != g[5]  # one query's relevant products, whoever searched
    assert len({g[0], g[2], g[3], g[5]}) == 4


def test_hard_negatives_skip_the_other_positives_of_the_rows_query(tiny_model: str) -> None:
    """Rows 0 and 1 answer one query (items A and C): C is never row 0's hard negative."""
    cfg = Config()
    cfg.model.name_or_path = tiny_model
    cfg.train.hard_negatives, cfg.train.hard_negative_pool = 1, 2
    items, tok = _items(), load_tokenizer(cfg.model)
    batch = {
        "kind": np.array(["search", "search"], dtype=object),
        "user_id": np.array(["u1", "u2"], dtype=object),
        "query": np.array(["shoe or bed", "Shoe or bed"], dtype=object),
        "history": np.array([None, None], dtype=object),
        "item_id": np.array(["A", "C"], dtype=object),
        "weight": np.ones(2),
    }
    for seed in range(12):  # the draw is seeded: without the rule C would come up about half the time
        cfg.train.seed = seed
        f = features(batch, items, tok, cfg, hard_negatives_for(items, cfg))
        b_text = tok([items.texts[1]], truncation=True, max_length=cfg.model.max_item_tokens)["input_ids"][0]
        assert [h.tolist() for h in f["h_ids"][0]] == [b_text], seed  # row 0 (A): only B is left
        assert [h.tolist() for h in f["h_ids"][1]] == [b_text], seed  # row 1 (C): A is the other positive, B is left


def test_pipeline_features_round_trip_to_the_same_tensors(tiny_model: str) -> None:
    """Featurize's arrow output, as Ray Data hands it back in numpy batches, pads to what collate gives."""
    cfg = Config()
    cfg.model.name_or_path = tiny_model
    tok = load_tokenizer(cfg.model)
    items = _items()
    actor = Featurize.__new__(Featurize)  # its __init__ only loads these from storage
    actor.cfg, actor.items, actor.negatives, actor.tokenizer = cfg, items, None, tok
    actor.tokens = BatchTokens(items, tok, cfg.model)
    table = actor(_batch())
    as_numpy = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    got = to_tensors(as_numpy, tok.pad_token_id)
    want = collate(_batch(), items, tok, cfg)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _shoe_shop(pool: int) -> tuple[ItemTable, HardNegatives]:
    rows = [  # (id, text, duplicate group)
        ("A", "red lightweight running shoe", 0),
        ("A2", "red lightweight running shoe", 0),  # A's duplicate: never A's negative
        ("B", "blue lightweight running shoe", 1),
        ("C", "running socks", 2),
        ("D", "memory foam dog bed", 3),
        ("E", "glass french press", 4),
    ]
    items = ItemTable(pa.Table.from_pylist(
        [{"item_id": i, "title": t, "brand": None, "category": None, "price": None, "text": t, "dup_group": g, "popularity": 1}
         for i, t, g in rows],
        schema=ITEMS_SCHEMA,
    ))
    return items, HardNegatives(items, pool=pool)


def test_hard_negatives_are_bm25_neighbours_and_never_hits() -> None:
    items, miner = _shoe_shop(pool=1)
    a, b, c = (items.index[i] for i in ("A", "B", "C"))
    no_history = np.zeros(0, dtype=np.int64)
    # A's nearest text is its duplicate A2, then B: the duplicate is skipped.
    assert miner.rows(np.array([a]), [no_history], 1).tolist() == [[b]]
    # B in the history is a hit too, so the next neighbour (the other "running" item) comes.
    assert miner.rows(np.array([a]), [np.array([b])], 1).tolist() == [[c]]
    # Two from a pool of two: both neighbours, in some order; never A, A2 or a history item.
    _, miner2 = _shoe_shop(pool=2)
    got = miner2.rows(np.array([a, b]), [no_history, np.array([c])], 2)
    assert sorted(got[0].tolist()) == [b, c]
    assert c not in got[1] and b not in got[1] and len(set(got[1].tolist())) == 2
    with pytest.raises(ValueError, match="hard_negatives=5"):
        miner.rows(np.array([a]), [np.array([b, c])], 5)


def test_hard_negatives_reach_the_loss_through_both_feeding_modes(tiny_model: str) -> None:
    from recsys.losses import SampledSoftmaxLoss
    from recsys.model import build_two_tower
    from recsys.train import TrainStep

    cfg = Config()
    cfg.model.name_or_path = tiny_model
    cfg.train.hard_negatives = 2
    tok = load_tokenizer(cfg.model)
    items, miner = _shoe_shop(pool=2)  # pool == n: the draw is deterministic, both modes see the same
    batch = {
        "query": np.array(["red running shoe", "dog bed"], dtype=object),
        "history": np.array([None, np.array(["E"])], dtype=object),
        "item_id": np.array(["A", "D"], dtype=object),
        "weight": np.array([1.0, 1.0]),
    }
    with pytest.raises(ValueError, match="hard_negatives=2 needs a HardNegatives miner"):
        collate(batch, items, tok, cfg)
    b = collate(batch, items, tok, cfg, miner)
    assert b["h_ids"].shape[0] == 4 and b["h_mask"].shape == b["h_ids"].shape
    actor = Featurize.__new__(Featurize)
    actor.cfg, actor.items, actor.negatives, actor.tokenizer = cfg, items, miner, tok
    actor.tokens = BatchTokens(items, tok, cfg.model)
    table = actor(batch)
    got = to_tensors({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}, tok.pad_token_id)
    assert torch.equal(got["h_ids"], b["h_ids"]) and torch.equal(got["h_mask"], b["h_mask"])
    hard_rows = miner.rows(np.array([items.index["A"], items.index["D"]]), [np.zeros(0, np.int64), np.array([items.index["E"]])], 2)
    assert b["h_logq"].shape == (2, 2) and torch.equal(got["h_logq"], b["h_logq"])
    assert torch.allclose(b["h_logq"].sort(dim=1).values, torch.tensor(np.sort(items.logq[hard_rows], axis=1)))
    # Their keys and duplicate groups travel too (the loss masks same-group positives by them).
    for k, col in (("h_keys", items.keys), ("h_dups", items.dups)):
        assert torch.equal(got[k], b[k]) and sorted(b[k].flatten().tolist()) == sorted(col[hard_rows].flatten().tolist()), k

    torch.manual_seed(0)
    step = TrainStep(build_two_tower(cfg.model), SampledSoftmaxLoss(gather=False))
    with_hard = step(b)
    without = step({k: v for k, v in b.items() if k not in ("h_ids", "h_mask", "h_logq")})
    # More negatives in each row's softmax can only raise its cross-entropy, and by a visible
    # amount: logQ-corrected like the in-batch logits, not e^(-log Q) below them.
    assert with_hard.item() > without.item() + 0.05
    with_hard.backward()
    assert all(p.grad is not None for p in step.towers.parameters() if p.requires_grad)


def test_item_tokens_are_the_tokenizers_whether_kept_or_past_the_budget(tiny_model: str) -> None:
    """The cache gives what tokenising each text gives, in the asked order with repeats, and stops
    keeping rows once its byte budget is spent (those are tokenised again each time)."""
    from recsys.features import _ENTRY_BYTES

    cfg = Config()
    cfg.model.name_or_path = tiny_model
    cfg.model.max_item_tokens = 8
    tok, items = load_tokenizer(cfg.model), _items()
    want = tok([items.texts[r] for r in range(3)], truncation=True, max_length=8)["input_ids"]
    budget = sum(4 * len(want[r]) + 8 + _ENTRY_BYTES for r in (2, 0))  # rows 2 and 0, asked first, fit
    cache = ItemTokens(items.texts, tok, cfg.model, max_bytes=budget)
    rows = [2, 0, 2, 1, 0]
    for _ in range(2):
        got = cache.ids_for(rows)
        assert [g.tolist() for g in got] == [want[r] for r in rows]
        assert all(g.dtype == np.int32 for g in got)
        assert sorted(cache.kept.ids) == [0, 2] and cache.kept.used == budget  # row 1 did not fit
    assert cache.ids_for([]) == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_tokens_places_every_value_on_its_side(side: str) -> None:
    """Lists (the tokenizer's) and int32 arrays (Ray Data's, the cache's) pad alike."""
    rows = [[5, 6, 7], [], [8], [9, 10]]
    want_ids = [[5, 6, 7], [0, 0, 0], [8, 0, 0], [9, 10, 0]] if side == "right" else [[5, 6, 7], [0, 0, 0], [0, 0, 8], [0, 9, 10]]
    for given in (rows, [np.asarray(r, dtype=np.int32) for r in rows]):
        ids, mask = pad_tokens(given, 0, side)
        assert ids.dtype == torch.int64 and ids.tolist() == want_ids
        assert mask.tolist() == [[int(v != 0) for v in r] for r in want_ids]
    ids, mask = pad_tokens([[], []], 3, side)
    assert ids.tolist() == [[3], [3]] and mask.tolist() == [[0], [0]]
    with pytest.raises(ValueError, match="padding side"):
        pad_tokens(rows, 0, "middle")


def _random_parts(rng: np.random.Generator, rows: int) -> list[list[str]]:
    words = ["Shoe", "naïve", "CAFÉ", "跑步鞋", "红色", "日本語のテキスト", "한국어", "don't", "U.S.A.", "3.5mm", "—",
             "emoji😀", "x" * 40, "Ｆｕｌｌ", "\t", "  ", "[SEP]", "a,b", "e\u0301"]
    return [[" ".join(rng.choice(words, int(rng.integers(0, 15)))) for _ in range(int(rng.integers(0, 6)))]
            for _ in range(rows)]


def test_query_tokens_composed_from_parts_equal_tokenising_the_text_whole() -> None:
    """WordPiece (the bundled MiniLM's): ids composed from cached parts are the tokenizer's own
    for the joined text, truncation included, on text in several scripts, with accents,
    punctuation, whitespace-only and empty parts, and HISTORY_SEP's own token inside a part."""
    from recsys.config import ModelConfig
    from recsys.encoder import HISTORY_SEP
    from recsys.features import QueryTokens

    m = ModelConfig(name_or_path="bundled", max_query_tokens=48, query_prefix="query: ")
    tok = load_tokenizer(m)
    parts = _random_parts(np.random.default_rng(0), 1500)
    want = tok([m.query_prefix + HISTORY_SEP.join(p) for p in parts], truncation=True, max_length=48)["input_ids"]
    q = QueryTokens(tok, m, check_rows=0)  # no self-check: the composition alone is under test
    assert q.compose
    for _ in range(2):  # cold, then from the cache
        got = q.ids_for(parts)
        assert [g.tolist() for g in got] == want
    assert any(len(w) == 48 for w in want) and any(len(w) < 48 for w in want)


def test_query_tokens_tokenise_whole_where_composing_is_not_known_to_hold(caplog: pytest.LogCaptureFixture) -> None:
    """A tokenizer that does not split words first (a sentencepiece-style Metaspace here), one
    that truncates on the left, or a limit with no room past the special tokens is not composed;
    and where the self-check finds a composed row that differs, that batch and every later one
    are tokenised whole."""
    from tokenizers import pre_tokenizers

    from recsys.config import ModelConfig
    from recsys.encoder import HISTORY_SEP
    from recsys.features import QueryTokens

    m = ModelConfig(name_or_path="bundled", max_query_tokens=32)
    parts = _random_parts(np.random.default_rng(1), 200)
    texts = [HISTORY_SEP.join(p) for p in parts]
    tok = load_tokenizer(m)
    want = tok(texts, truncation=True, max_length=32)["input_ids"]
    broken = QueryTokens(tok, m, check_rows=8)
    broken.sep = np.array([7], dtype=np.int32)  # a wrong separator id: composed rows with 2+ parts differ
    with caplog.at_level("WARNING"):
        assert [list(g) for g in broken.ids_for(parts)] == want
    assert not broken.compose and "differ from tokenising" in caplog.text
    assert [list(g) for g in broken.ids_for(parts)] == want

    metaspace, left = load_tokenizer(m), load_tokenizer(m)
    metaspace.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    left.truncation_side = "left"
    for other in (metaspace, left):
        q = QueryTokens(other, m)
        assert not q.compose
        assert [list(g) for g in q.ids_for(parts)] == other(texts, truncation=True, max_length=32)["input_ids"]
    assert not QueryTokens(tok, ModelConfig(name_or_path="bundled", max_query_tokens=2)).compose  # [CLS] [SEP] only


def test_query_tokens_check_batches_of_any_size() -> None:
    """The self-check covers the first check_rows rows however the batches fall (larger than it,
    or not dividing it), and composing goes on after it when they all agree."""
    from recsys.config import ModelConfig
    from recsys.encoder import HISTORY_SEP
    from recsys.features import QueryTokens

    m = ModelConfig(name_or_path="bundled", max_query_tokens=32)
    tok = load_tokenizer(m)
    parts = _random_parts(np.random.default_rng(2), 700)
    want = tok([HISTORY_SEP.join(p) for p in parts], truncation=True, max_length=32)["input_ids"]
    q = QueryTokens(tok, m, check_rows=100)
    got = q.ids_for(parts[:300]) + q.ids_for(parts[300:350]) + q.ids_for(parts[350:])
    assert q.compose and q.check_left == 0
    assert [g.tolist() for g in got] == want
