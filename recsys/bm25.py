"""BM25 over catalog item texts: the lexical baseline, the hard-negative miner, later serving.

One builder and one analyser for every use, set by the config's `bm25` section (BM25Config) and
saved with the index, so a server queries an index the way it was built:

- words: `recsys.text_tokens.tokenize` with bm25s's English stopwords, which also reads Chinese,
  Japanese, Korean and Thai (unspaced runs give bigrams and their characters; see `tokenize`);
- words of spaced scripts are stemmed (Snowball, `bm25.stemmer`; "drills" and "drill" match);
- each word counts `bm25.word_weight` times, beside the character n-grams of every spaced-script
  word (`bm25.char_ngrams`, marked at the word's ends), so a misspelt query still matches;
- Lucene's BM25 scoring (`bm25.k1`, `bm25.b`); rows are the indexed texts' positions.

Measured on Home Depot's validation queries (docs/results.md, `bench/lexical.py`): stemming,
keeping one-character words ("1/2", "2 x 4") and the n-grams lift NDCG@10 from 0.325 (the old
analyser: words as written, at least two characters, k1=1.5) to 0.410. An index saved without
an analyser record (before it existed) loads with that old analyser, so it scores as it did.
`save`/`load` keep an index in a local folder.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.config import BM25Config
from recsys.text_tokens import TOKENIZER_VERSION, from_unspaced_run, tokenize

log = logging.getLogger(__name__)

META_FILE = "recsys_bm25.json"
# The "tokenizer" an index with an analyser record writes: code from before the analyser knows
# only TOKENIZER_VERSION, so it refuses such an index ("rebuild") instead of querying stemmed,
# n-grammed tokens with bare words.
ANALYSED_FORMAT = TOKENIZER_VERSION + "+analyser-1"


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


# The analyser of indexes saved before the analyser was configurable (no record in their metadata).
LEGACY_ANALYSER = BM25Config(stemmer="none", char_ngrams=0, word_weight=1, min_word_len=2, k1=1.5, b=0.75)


def _quiet_bm25s() -> None:
    # bm25s sets its own logger to DEBUG at import, so every index build prints "Building index
    # from tokens" whatever the application's log level; its warnings stay visible.
    logging.getLogger("bm25s").setLevel(logging.WARNING)


_local = threading.local()


def _stemmer(language: str) -> Any:
    # One per thread: PyStemmer's objects must not be called concurrently, and a replica stems
    # queries on its event loop while a catalog swap may rebuild BM25 in a worker thread.
    cache = _local.__dict__.setdefault("stemmers", {})
    if language not in cache:
        import Stemmer

        cache[language] = Stemmer.Stemmer(language)
    return cache[language]


def bm25_tokens(texts: Sequence[str], analyser: BM25Config) -> list[list[str]]:
    """The tokens BM25 indexes and queries with (one list per text)."""
    stop = _stopwords()
    stem = None if analyser.stemmer == "none" else _stemmer(analyser.stemmer)
    n = analyser.char_ngrams
    out = []
    for t in texts:
        toks = tokenize(t or "", stopwords=stop, min_word_len=analyser.min_word_len, unigrams=True)
        spaced: list[str] = []
        runs: list[str] = []
        for w in toks:
            (runs if from_unspaced_run(w) else spaced).append(w)
        # A stemmer can reduce a word to nothing ("s" under porter): dropped, never an empty token.
        stems = spaced if stem is None else [w for w in stem.stemWords(spaced) if w]
        words = stems + runs
        grams: list[str] = []
        if n:
            # "~" never occurs in a word token, so an n-gram cannot collide with a word.
            for w in spaced:
                m = f"#{w}#"
                grams.extend("~" + m[i : i + n] for i in range(max(1, len(m) - n + 1)))
        out.append(words * analyser.word_weight + grams)
    return out


class BM25Index:
    """A BM25 index over texts; rows are the texts' positions (optionally with item ids)."""

    def __init__(self, retriever: Any, num_docs: int, item_ids: list[str] | None = None,
                 analyser: BM25Config | None = None) -> None:
        self._retriever = retriever
        self.num_docs = num_docs
        self.item_ids = item_ids
        self.analyser = analyser or BM25Config()

    @classmethod
    def build(cls, texts: Sequence[str], item_ids: Sequence[str] | None = None,
              analyser: BM25Config | None = None) -> BM25Index:
        import bm25s

        _quiet_bm25s()
        if not texts:
            raise ValueError("BM25Index.build: no texts to index")
        if item_ids is not None and len(item_ids) != len(texts):
            raise ValueError(f"BM25Index.build: {len(texts)} texts but {len(item_ids)} item ids")
        analyser = analyser or BM25Config()
        retriever = bm25s.BM25(k1=analyser.k1, b=analyser.b)
        retriever.index(bm25_tokens(texts, analyser), show_progress=False)
        return cls(retriever, len(texts), list(item_ids) if item_ids is not None else None, analyser)

    def retrieve(self, queries: Sequence[str], k: int) -> np.ndarray:
        """(queries, min(k, num_docs)) int64 rows, best first. A query with no known token
        scores every text 0 (its rows are then arbitrary)."""
        k = min(k, self.num_docs)
        if not queries or k <= 0:
            return np.zeros((len(queries), max(k, 0)), dtype=np.int64)
        docs, _ = self._retriever.retrieve(bm25_tokens(queries, self.analyser), k=k, show_progress=False)
        return np.asarray(docs, dtype=np.int64)

    def scores(self, query: str, rows: np.ndarray | None = None) -> np.ndarray:
        """BM25 score of `query` for `rows` (all texts when None), float32."""
        toks = bm25_tokens([query], self.analyser)[0]
        n = self.num_docs if rows is None else len(rows)
        if not toks:
            return np.zeros(n, dtype=np.float32)
        s = np.asarray(self._retriever.get_scores(toks), dtype=np.float32)
        return s if rows is None else s[np.asarray(rows, dtype=np.int64)]

    def save(self, directory: str | Path) -> None:
        """Write the index to a local folder (bm25s's arrays + vocabulary, and our metadata)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(d), show_progress=False)
        meta = {"tokenizer": ANALYSED_FORMAT, "analyser": self.analyser.model_dump(), "num_docs": self.num_docs,
                "item_ids": self.item_ids}
        (d / META_FILE).write_text(json.dumps(meta, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        import bm25s

        _quiet_bm25s()
        d = Path(directory)
        meta_path = d / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: not a BM25 index folder written by BM25Index.save")
        meta = json.loads(meta_path.read_text())
        # An analyser record goes with the analysed tag; an index from before has neither.
        if meta.get("tokenizer") != (ANALYSED_FORMAT if "analyser" in meta else TOKENIZER_VERSION):
            raise ValueError(
                f"{meta_path}: index built with tokenizer {meta.get('tokenizer')!r}, this code tokenises "
                f"with {ANALYSED_FORMAT!r}: rebuild the index"
            )
        retriever = bm25s.BM25.load(str(d), load_corpus=False, show_progress=False)
        analyser = BM25Config(**meta["analyser"]) if "analyser" in meta else LEGACY_ANALYSER
        return cls(retriever, int(meta["num_docs"]), meta.get("item_ids"), analyser)
