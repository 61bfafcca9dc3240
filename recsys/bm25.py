"""BM25 over catalog item texts: the lexical baseline, the hard-negative miner, later serving.

One builder and one tokeniser for every use (`recsys.text_tokens.tokenize` with bm25s's English
stopwords, words of at least two characters, as `bm25s.tokenize` did before, so English
results stay the same), which also reads Chinese, Japanese, Korean and Thai: there
`bm25s.tokenize` kept each unspaced run as one token (a query matched only a whole identical
run) and dropped one-character runs. Unspaced runs give bigrams and their characters (see
`tokenize`). Scoring is bm25s's (Lucene BM25, k1=1.5, b=0.75); rows are the indexed texts'
positions. `save`/`load` keep an index in a local folder, with the tokeniser's version, so a
server can load what a job built.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.text_tokens import TOKENIZER_VERSION, tokenize

log = logging.getLogger(__name__)

META_FILE = "recsys_bm25.json"


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def _quiet_bm25s() -> None:
    # bm25s sets its own logger to DEBUG at import, so every index build prints "Building index
    # from tokens" whatever the application's log level; its warnings stay visible.
    logging.getLogger("bm25s").setLevel(logging.WARNING)


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    """The tokens BM25 indexes and queries with (one list per text)."""
    stop = _stopwords()
    return [tokenize(t or "", stopwords=stop, min_word_len=2, unigrams=True) for t in texts]


class BM25Index:
    """A BM25 index over texts; rows are the texts' positions (optionally with item ids)."""

    def __init__(self, retriever: Any, num_docs: int, item_ids: list[str] | None = None) -> None:
        self._retriever = retriever
        self.num_docs = num_docs
        self.item_ids = item_ids

    @classmethod
    def build(cls, texts: Sequence[str], item_ids: Sequence[str] | None = None) -> BM25Index:
        import bm25s

        _quiet_bm25s()
        if not texts:
            raise ValueError("BM25Index.build: no texts to index")
        if item_ids is not None and len(item_ids) != len(texts):
            raise ValueError(f"BM25Index.build: {len(texts)} texts but {len(item_ids)} item ids")
        retriever = bm25s.BM25()
        retriever.index(bm25_tokens(texts), show_progress=False)
        return cls(retriever, len(texts), list(item_ids) if item_ids is not None else None)

    def retrieve(self, queries: Sequence[str], k: int) -> np.ndarray:
        """(queries, min(k, num_docs)) int64 rows, best first. A query with no known token
        scores every text 0 (its rows are then arbitrary)."""
        k = min(k, self.num_docs)
        if not queries or k <= 0:
            return np.zeros((len(queries), max(k, 0)), dtype=np.int64)
        docs, _ = self._retriever.retrieve(bm25_tokens(queries), k=k, show_progress=False)
        return np.asarray(docs, dtype=np.int64)

    def scores(self, query: str, rows: np.ndarray | None = None) -> np.ndarray:
        """BM25 score of `query` for `rows` (all texts when None), float32."""
        toks = bm25_tokens([query])[0]
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
        meta = {"tokenizer": TOKENIZER_VERSION, "num_docs": self.num_docs, "item_ids": self.item_ids}
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
        if meta.get("tokenizer") != TOKENIZER_VERSION:
            raise ValueError(
                f"{meta_path}: index built with tokenizer {meta.get('tokenizer')!r}, this code tokenises "
                f"with {TOKENIZER_VERSION!r}: rebuild the index"
            )
        retriever = bm25s.BM25.load(str(d), load_corpus=False, show_progress=False)
        return cls(retriever, int(meta["num_docs"]), meta.get("item_ids"))
