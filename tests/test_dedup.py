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


# Chinese, Japanese and Korean catalogs: words are not separated by spaces (or carry particles),
# so duplicate detection must not see them as empty text.
def test_cjk_distinct_products_stay_apart_and_colour_variants_group() -> None:
    titles = [
        "迅跑 轻量跑步鞋 红色 42码",      # 0: variants of one shoe ...
        "迅跑 轻量跑步鞋 蓝色 43码",      # 1
        "迅跑轻量跑步鞋 黑色",            # 2  (written without the space, no size)
        "咖乐 不锈钢磨豆机 白色",         # 3: distinct products
        "营家 超轻双人帐篷 绿色",         # 4
        "ナイキ ランニングシューズ ブラック 26.5cm",  # 5: Japanese colour variants ...
        "ナイキ ランニングシューズ ホワイト 26.5cm",  # 6
        "象印 電気ケトル 1.0L",           # 7: ... and a distinct product
        "나이키 러닝화 블랙 270mm",        # 8: Korean colour variants ...
        "나이키 러닝화 화이트 270mm",      # 9
        "삼성 무선 이어폰 블랙",           # 10: ... and distinct products
        "나이키 축구화 블랙 270mm",        # 11
    ]
    groups = duplicate_groups([str(i) for i in range(len(titles))], titles, 0.8)
    assert groups.tolist() == [0, 0, 0, 3, 4, 5, 5, 7, 8, 8, 10, 11]


def test_exact_duplicates_in_cjk_group_at_threshold_one() -> None:
    groups = duplicate_groups(list("abcd"), ["不锈钢磨豆机", "不锈钢磨豆机！", "法压壶", "ﾗﾝﾆﾝｸﾞｼｭｰｽﾞ"], 1.0)
    assert groups.tolist() == [0, 0, 2, 3]
    # Half-width katakana is the same text as full-width (NFKC).
    assert duplicate_groups(["x", "y"], ["ﾗﾝﾆﾝｸﾞｼｭｰｽﾞ", "ランニングシューズ"], 1.0).tolist() == [0, 0]


def test_items_without_any_word_are_never_grouped() -> None:
    titles = ["", "!!!", "★★★ ", "—", "Blue Mug", "blue mug"]
    for threshold in (0.8, 1.0):
        assert duplicate_groups(list("abcdef"), titles, threshold).tolist() == [0, 1, 2, 3, 4, 4]
