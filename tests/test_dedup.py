from __future__ import annotations

import numpy as np

from recsys.data.dedup import duplicate_groups, popularity_skew
from recsys.data.text import render_item_text


def test_variants_group_and_distinct_products_do_not() -> None:
    titles = [
        "Acme Trail Running Shoe - Red, Size 9",
        "Acme Trail Running Shoe - Blue, Size 10",
        "Zeta Burr Coffee Grinder 200W",
        "ACME trail running shoe red size 9!",
        "Stainless steel water bottle",
        "Acme Road Running Shoe - Red",
    ]
    groups = duplicate_groups(list("abcdef"), titles, 0.8)
    assert groups.tolist() == [0, 0, 2, 0, 4, 5]


def test_exact_duplicates_group_even_at_threshold_one() -> None:
    groups = duplicate_groups(["x", "y", "z"], ["Blue Mug", "blue mug.", "Red Kettle"], 1.0)
    assert groups.tolist() == [0, 0, 2]


def test_popularity_skew() -> None:
    uniform = popularity_skew(np.full(100, 5))
    skewed = popularity_skew(np.array([1000] + [1] * 99))
    assert abs(uniform["gini"]) < 1e-9 and uniform["top10pct_share"] == 0.1
    assert skewed["gini"] > 0.85 and skewed["top1pct_share"] > 0.9


def test_render_item_text_title_first_and_robust() -> None:
    text = render_item_text(
        {"title": "Mesh Task Chair", "brand": "Sitwell", "category": "Office > Chairs",
         "attributes": '{"colour": "Black"}', "description": None}
    )
    assert text.startswith("Mesh Task Chair") and "Sitwell" in text and "colour: Black" in text
    assert render_item_text({"title": "Only title"}) == "Only title"
