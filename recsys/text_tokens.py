"""The one lexical tokeniser: duplicate detection and BM25 both split text with `tokenize`.

Text is NFKC-normalised (full-width Latin and digits, half-width katakana become their usual
forms) and case-folded. Scripts written with spaces give words: runs of letters, digits and
their combining marks (so Devanagari or accented Latin stay whole). Scripts written without
spaces (Han, Hiragana, Katakana, Hangul, Thai) give overlapping character bigrams of each run,
or the character itself for a one-character run: with no word segmenter, bigrams are the usual
trade-off for search and near-duplicate matching (as Lucene's CJK analyser does).

ASCII text takes the stdlib `re` path (the `regex` module is ~4x slower), with the same result.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

import regex

# Script_Extensions, so that marks shared by kana (the prolonged sound mark, iteration marks)
# join their run; punctuation and symbols of those blocks (。、「」・) separate runs.
_RUN_CLASS = r"[\p{scx=Han}\p{scx=Hiragana}\p{scx=Katakana}\p{scx=Hangul}\p{scx=Thai}--\p{P}--\p{S}--\p{Z}]"
_SEGMENT = regex.compile(
    rf"(?P<run>{_RUN_CLASS}+)|(?P<word>(?:[[\p{{L}}\p{{N}}]--{_RUN_CLASS}]\p{{M}}*)+)", regex.V1
)
_RUN_CHAR = regex.compile(_RUN_CLASS, regex.V1)
# For ASCII the class above is exactly letters and digits (not "_", unlike `\w`).
_ASCII_WORD = re.compile(r"[a-z0-9]+")

# Bumped when `tokenize` changes what it emits, so a saved BM25 index can tell it is stale.
TOKENIZER_VERSION = "unicode-bigram-1"


def normalize(text: str) -> str:
    """NFKC, then case-folded (the form every token is taken from)."""
    return unicodedata.normalize("NFKC", text).casefold()


def segments(text: str) -> list[tuple[str, bool]]:
    """(segment, is_unspaced_run) in order: words of spaced scripts, whole runs of the others."""
    t = normalize(text)
    if t.isascii():
        return [(w, False) for w in _ASCII_WORD.findall(t)]
    return [(m.group(), m.lastgroup == "run") for m in _SEGMENT.finditer(t)]


def tokenize(
    text: str, stopwords: Collection[str] = frozenset(), min_word_len: int = 1, unigrams: bool = False
) -> list[str]:
    """Tokens of `text`, in order (repeats kept: BM25 counts them).

    `stopwords` and `min_word_len` apply to words of spaced scripts only; a one-character run
    of an unspaced script ("鞋", "红") is a whole word there and is always kept. `unigrams` adds
    every character of longer runs too, so that a one-character query ("鞋") still matches
    "跑步鞋" (search wants that; near-duplicate matching does not: shared characters would make
    distinct products look alike)."""
    out: list[str] = []
    for seg, run in segments(text):
        if not run:
            if len(seg) >= min_word_len and seg not in stopwords:
                out.append(seg)
        elif len(seg) == 1:
            out.append(seg)
        else:
            out.extend(seg[i : i + 2] for i in range(len(seg) - 1))
            if unigrams:
                out.extend(seg)
    return out


def from_unspaced_run(token: str) -> bool:
    """Whether a `tokenize` token is a bigram or character of an unspaced run, not a word of a
    spaced script (words never hold a run's characters, and runs hold nothing else)."""
    return not token.isascii() and _RUN_CHAR.match(token) is not None
