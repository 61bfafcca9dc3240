"""Hybrid retrieval (recsys/hybrid.py): candidates, both fusions by hand, the choice on validation."""

from __future__ import annotations

import numpy as np
import pytest

from recsys import hybrid
from recsys.hybrid import Fusion

#               item:   0    1    2    3    4    5
DENSE = np.array([0.90, 0.80, 0.10, 0.70, 0.20, 0.00])
LEXICAL = np.array([0.0, 2.0, 8.0, 0.0, 4.0, 1.0])
ALL = np.ones(6, dtype=bool)


def test_candidates_are_both_top_lists_with_ranks_and_minmax_scores() -> None:
    c = hybrid.candidates(DENSE, LEXICAL, ALL, 2)
    # dense top 2: 0, 1; BM25 top 2: 2, 4
    assert c.rows.tolist() == [0, 1, 2, 4]
    assert c.dense_rank.tolist() == [1, 2, 0, 0]
    assert c.lexical_rank.tolist() == [0, 0, 1, 2]
    # min-max over the candidates: dense 0.1..0.9, BM25 0..8
    np.testing.assert_allclose(c.dense, [1.0, 0.875, 0.0, 0.125])
    np.testing.assert_allclose(c.lexical, [0.0, 0.25, 1.0, 0.5])


def test_convex_by_hand_and_its_ends_are_the_two_rankings() -> None:
    c = hybrid.candidates(DENSE, LEXICAL, ALL, 2)
    rows, scores = hybrid.top_k(c, Fusion("convex", 0.5), 4)
    # fused: 0 -> 0.5, 1 -> 0.5625, 2 -> 0.5, 4 -> 0.3125; the tie 0 / 2 goes to the higher dense score
    assert rows.tolist() == [1, 0, 2, 4]
    np.testing.assert_allclose(scores, [0.5625, 0.5, 0.5, 0.3125])
    assert hybrid.top_k(c, Fusion("convex", 1.0), 4)[0].tolist() == [0, 1, 4, 2]  # dense order
    assert hybrid.top_k(c, Fusion("convex", 0.0), 4)[0].tolist() == [2, 4, 1, 0]  # BM25 order


def test_rrf_by_hand() -> None:
    c = hybrid.candidates(DENSE, LEXICAL, ALL, 3)
    # dense top 3: 0, 1, 3; BM25 top 3: 2, 4, 1 -> item 1 is in both
    rows, scores = hybrid.top_k(c, Fusion("rrf", rrf_k=10), 5)
    expected = {1: 1 / 12 + 1 / 13, 0: 1 / 11, 2: 1 / 11, 4: 1 / 12, 3: 1 / 13}
    assert rows.tolist() == [1, 0, 2, 4, 3]  # 0 and 2 tie: the dense score decides
    np.testing.assert_allclose(scores, [expected[r] for r in rows.tolist()], rtol=1e-6)


def test_filters_and_exclusions_never_come_back() -> None:
    allowed = ALL.copy()
    allowed[[1, 2]] = False
    rows, _ = hybrid.fuse(DENSE, LEXICAL, allowed, 6, Fusion("convex", 0.5, candidates=6))
    assert set(rows.tolist()) == {0, 3, 4, 5}


def test_a_query_without_bm25_tokens_ranks_by_dense_alone() -> None:
    rows, _ = hybrid.fuse(DENSE, np.zeros(6), ALL, 6, Fusion("convex", 0.3, candidates=6))
    assert rows.tolist() == [0, 1, 3, 4, 2, 5]
    rows, _ = hybrid.fuse(DENSE, np.zeros(6), ALL, 3, Fusion("rrf", candidates=6))
    assert rows.tolist() == [0, 1, 3]


def test_choose_fusion_finds_the_weight_the_queries_need() -> None:
    ids = [f"i{n}" for n in range(6)]
    c = hybrid.candidates(DENSE, LEXICAL, ALL, 6)
    # Item 2 is relevant: BM25's first, dense's 5th. Only a lexical-heavy fusion puts it first.
    fusion, grid = hybrid.choose_fusion([c], [{"i2": 1.0}], ids, metric_k=1)
    assert fusion.method == "convex" and fusion.weight < 0.5
    assert grid[fusion.describe()] == 1.0 and grid["convex, dense weight 1.0"] == 0.0
    # Item 1 relevant: 2nd in both lists, so RRF (tried first) puts it first; ties keep RRF.
    fusion, _ = hybrid.choose_fusion([c], [{"i1": 1.0}], ids, metric_k=1)
    assert fusion.method == "rrf"
    fixed, grid = hybrid.choose_fusion([c], [{"i0": 1.0}], ids, metric_k=1, method="convex", weight=0.25)
    assert (fixed.method, fixed.weight) == ("convex", 0.25) and list(grid) == ["convex, dense weight 0.25"]


@pytest.mark.parametrize("bad", [dict(method="sum"), dict(weight=1.5), dict(candidates=0), dict(rrf_k=0)])
def test_bad_fusion_is_refused_by_name(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Fusion(**bad)


def test_fusion_round_trips_through_its_record() -> None:
    f = Fusion("convex", 0.35, 50, 20)
    assert Fusion.from_dict(f.to_dict()) == f


def test_a_top_k_longer_than_the_candidate_lists_is_not_cut_short() -> None:
    dense = np.linspace(1.0, 0.0, 50)
    rows, _ = hybrid.fuse(dense, np.zeros(50), np.ones(50, dtype=bool), 30, Fusion("rrf", candidates=10))
    assert rows.tolist() == list(range(30))


def test_ties_at_the_cut_go_to_the_lower_position() -> None:
    lexical = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    c = hybrid.candidates(np.zeros(6), lexical, np.ones(6, dtype=bool), 3)
    assert sorted(c.rows[c.lexical_rank > 0].tolist()) == [1, 2, 5]  # of the tied 1-4, the first two


def test_config_refuses_a_weight_for_rrf_and_a_memory_that_never_starts() -> None:
    from recsys.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="hybrid.*weight"):
        load_config(None, ["hybrid.fusion=rrf", "hybrid.weight=0.3"])
    with pytest.raises(ConfigError, match="memory_start_step"):
        load_config(None, ["train.memory_size=64", "train.memory_start_step=100", "train.max_steps=100"])
