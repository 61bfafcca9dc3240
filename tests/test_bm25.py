"""The BM25 analyser (recsys/bm25.py, the config's `bm25` section): what it matches that the old
one missed, and that a saved index keeps the analyser it was built with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.bm25 import LEGACY_ANALYSER, META_FILE, BM25Index, bm25_tokens
from recsys.config import BM25Config, ConfigError, load_config
from recsys.text_tokens import TOKENIZER_VERSION

ITEMS = [
    "Elongated Closed Front Toilet Seat in White",
    "Round Toilet Tank Lid",
    "1/2 in. x 10 ft. Copper Pipe",
    "3/4 in. x 10 ft. Copper Pipe",
    "20-Volt Cordless Drill Kit",
    "Garden Hose Nozzle",
    "Drywall Screws 1-1/4 in. (1 lb.)",
    "White Interior Paint, 1 gal.",
]


def _top(ix: BM25Index, query: str) -> str:
    return ITEMS[int(ix.retrieve([query], 1)[0, 0])]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("toliet", ITEMS[:2]),  # misspelt: only the character n-grams match it
        ("1/2 copper pipe", ITEMS[2:3]),  # "1" and "2" are words now; the old analyser dropped them
        ("drills", ITEMS[4:5]),  # stemmed: "drills" meets "drill"
        ("dry wall", ITEMS[6:7]),  # run-together in the title
    ],
)
def test_the_analyser_matches_what_the_old_one_missed(query: str, expected: list[str]) -> None:
    ours = BM25Index.build(ITEMS)
    assert _top(ours, query) in expected
    # The same query through the old analyser misses (so this test tells them apart): it scores
    # the right item 0, or no higher than a wrong one.
    old = BM25Index.build(ITEMS, analyser=LEGACY_ANALYSER)
    scores = old.scores(query)
    right = max(scores[ITEMS.index(e)] for e in expected)
    assert right == 0 or (scores >= right).sum() > 1


def test_a_whole_word_match_outranks_a_partial_one() -> None:
    ix = BM25Index.build(["paint roller", "painter tape"])
    s = ix.scores("paint")
    assert s[0] > s[1] > 0  # "painter" shares n-grams with "paint", not the word


def test_unspaced_scripts_get_no_character_ngrams_and_no_stemming() -> None:
    toks = bm25_tokens(["跑步鞋 running"], BM25Config())[0]
    assert [t for t in toks if t.startswith("~")] == ["~#ru", "~run", "~unn", "~nni", "~nin", "~ing", "~ng#"]
    assert sorted(t for t in toks if not t.startswith("~")) == sorted(["跑步", "步鞋", "跑", "步", "鞋", "run"] * 2)


def test_a_saved_index_keeps_its_analyser(tmp_path: Path) -> None:
    analyser = BM25Config(stemmer="none", char_ngrams=4, word_weight=3, k1=0.9, b=0.5)
    ix = BM25Index.build(ITEMS, [f"i{n}" for n in range(len(ITEMS))], analyser)
    ix.save(tmp_path / "bm25")
    back = BM25Index.load(tmp_path / "bm25")
    assert back.analyser == analyser
    # Code from before the analyser accepts only the bare tokeniser tag: it must refuse this index
    # (its stemmed, n-grammed tokens would meet bare query words), not query it.
    assert json.loads((tmp_path / "bm25" / META_FILE).read_text())["tokenizer"] != TOKENIZER_VERSION
    for q in ("toliet seat", "copper pipe 3/4", "paint"):
        np.testing.assert_allclose(back.scores(q), ix.scores(q), rtol=1e-6)


def test_an_index_saved_before_the_analyser_loads_with_the_old_one(tmp_path: Path) -> None:
    old = BM25Index.build(ITEMS, analyser=LEGACY_ANALYSER)
    old.save(tmp_path / "bm25")
    meta_path = tmp_path / "bm25" / META_FILE
    meta = json.loads(meta_path.read_text())
    # What an index written before the `bm25` section holds: no analyser, the bare tokeniser tag.
    del meta["analyser"]
    meta["tokenizer"] = TOKENIZER_VERSION
    meta_path.write_text(json.dumps(meta))
    back = BM25Index.load(tmp_path / "bm25")
    assert back.analyser == LEGACY_ANALYSER
    np.testing.assert_allclose(back.scores("copper pipe"), old.scores("copper pipe"), rtol=1e-6)
    assert not back.scores("toliet").any()  # scores as it did: no n-grams


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bm25.stemmer=klingon", r"bm25\.stemmer: .*unknown stemmer 'klingon': none or one of .*english"),
        ("bm25.char_ngrams=1", r"bm25\.char_ngrams: .*0 \(off\) or 2-6"),
        ("bm25.char_ngrams=9", r"bm25\.char_ngrams: "),
        ("bm25.b=1.5", r"bm25\.b: "),
        ("bm25.k1=0", r"bm25\.k1: "),
    ],
)
def test_bad_analyser_settings_are_refused_with_the_key_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_config_section_reaches_the_index() -> None:
    cfg = load_config(None, ["bm25.stemmer=french", "bm25.char_ngrams=0"])
    ix = BM25Index.build(["chaussures de course"], analyser=cfg.bm25)
    assert ix.analyser.stemmer == "french"
    assert ix.scores("chaussure")[0] > 0  # the plural stemmed away (English would too); no n-grams


def test_an_analysed_index_without_its_analyser_record_is_refused(tmp_path: Path) -> None:
    BM25Index.build(ITEMS).save(tmp_path / "bm25")
    meta_path = tmp_path / "bm25" / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["analyser"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rebuild the index"):
        BM25Index.load(tmp_path / "bm25")


def test_the_hard_negative_miner_reads_with_the_configured_analyser() -> None:
    import pyarrow as pa

    from recsys.features import hard_negatives_for
    from recsys.items import ItemTable

    cfg = load_config(None, ["train.hard_negatives=1", "bm25.stemmer=none", "bm25.char_ngrams=4"])
    n = len(ITEMS)
    table = pa.table({"item_id": [f"i{i}" for i in range(n)], "text": ITEMS, "dup_group": list(range(n)), "popularity": [1] * n})
    miner = hard_negatives_for(ItemTable(table), cfg)
    assert miner is not None and miner.analyser == cfg.bm25


def test_a_word_stemmed_to_nothing_gives_no_token() -> None:
    # Porter stems "s" (as in "Lowe's") to "": an empty token would match every such text.
    toks = bm25_tokens(["Lowe's drills"], BM25Config(stemmer="porter", char_ngrams=0, word_weight=1))[0]
    assert "" not in toks and sorted(toks) == ["drill", "low"]
