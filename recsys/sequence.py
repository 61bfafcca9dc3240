"""The sequence user tower: a small transformer over the history's item vectors.

An item vector is the item tower's (frozen) text embedding, as it is or through an adaptor (linear,
or a whitening mixture of linear experts as UniSRec does), plus an optional learnt ID embedding that items
unseen in training lack, so a cold-start item still ranks by its text. The user vector is the
transformer's output at the newest history position. Both sides are L2-normalised and compared
by dot product, so the catalog side is a plain matrix: `item_vectors(text_emb)` once, then any
top-k index.

Histories are newest first (as the examples tables store them); position embeddings count from
the newest item, so position 0 means "the last thing the user did" whatever the history length.
The export is a folder (`sequence/`) holding `config.json`, `model.safetensors` and `items.json`
(item id -> ID-embedding row), readable by `load_sequence_tower` or by plain torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

SEQUENCE_DIR = "sequence"
PROGRAM_FILE = "tower.pt2"  # the same tower for plain torch (torch.export), README shows its use
_FILES = ("config.json", "model.safetensors", "items.json")


class MoEAdaptor(nn.Module):
    """Parametric whitening experts (UniSRec): sum_k g_k(x) * (x - b_k) W_k."""

    def __init__(self, in_dim: int, out_dim: int, experts: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(experts, in_dim))  # (experts, in)
        self.proj = nn.Parameter(torch.empty(experts, in_dim, out_dim))  # (experts, in, out)
        nn.init.normal_(self.proj, std=0.02)
        self.gate = nn.Linear(in_dim, experts, bias=False)
        nn.init.zeros_(self.gate.weight)  # equal experts at the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)  # (n, in)
        g = torch.softmax(self.gate(x), dim=-1)  # (n, experts)
        e, i, o = self.proj.shape
        # (x - b_k) W_k = x W_k - b_k W_k: one (n, in) x (in, experts*out) product.
        out = (x @ self.proj.permute(1, 0, 2).reshape(i, e * o)).view(-1, e, o)  # (n, experts, out)
        out = out - torch.einsum("ei,eio->eo", self.bias, self.proj)  # (n, experts, out)
        return (g.unsqueeze(-1) * out).sum(-2)  # (n, out)


class SequenceTower(nn.Module):
    def __init__(self, settings: Mapping[str, Any], text_dim: int, n_ids: int) -> None:
        """`settings` is the `sequence` config section as a dict; `n_ids` the number of items with
        an ID embedding (row 0 is reserved for "no ID": unseen items and padding)."""
        super().__init__()
        s = dict(settings)
        self.settings = s
        self.text_dim = int(text_dim)
        self.n_ids = int(n_ids)
        dim = int(s["dim"]) or self.text_dim  # 0: the item embedding's width
        if dim % int(s["heads"]):
            raise ValueError(f"sequence.heads={s['heads']} must divide the tower's width {dim} (sequence.dim, 0 = the item embedding's)")
        if s["adaptor"] == "moe":
            self.adaptor: nn.Module = MoEAdaptor(text_dim, dim, int(s["experts"]), float(s["adaptor_dropout"]))
        elif s["adaptor"] == "linear":
            self.adaptor = nn.Sequential(nn.Dropout(float(s["adaptor_dropout"])), nn.Linear(text_dim, dim))
        else:  # "none": the text embedding itself (dim must equal the text dim)
            if dim != text_dim:
                raise ValueError(f"sequence.adaptor=none needs sequence.dim 0 or the item embedding's width ({text_dim}), got {dim}")
            self.adaptor = nn.Identity()
        self.ids = nn.Embedding(self.n_ids + 1, dim, padding_idx=0) if s["item_ids"] and self.n_ids else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.02)
            with torch.no_grad():
                self.ids.weight[0].zero_()
        self.positions = nn.Embedding(int(s["max_len"]), dim)
        # At the scale of the item vectors: N(0, 1) positions would drown the items they mark.
        nn.init.normal_(self.positions.weight, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(float(s["dropout"]))
        layer = nn.TransformerEncoderLayer(
            dim, int(s["heads"]), int(s["ffn_dim"]), float(s["dropout"]), activation="gelu", batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, int(s["layers"]), enable_nested_tensor=False)
        self.causal = s["attention"] == "causal"

    def _raw_items(self, text_emb: torch.Tensor, id_rows: torch.Tensor | None) -> torch.Tensor:
        v = self.adaptor(text_emb)  # (n, dim)
        if self.ids is not None and id_rows is not None:
            v = v + self.ids(id_rows)
        return v

    def item_vectors(self, text_emb: torch.Tensor, id_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Item representations: adaptor(text) (+ ID embedding), L2-normalised. (n, dim)"""
        return nn.functional.normalize(self._raw_items(text_emb, id_rows), dim=-1)

    def encode_user(self, table: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """Users from their histories. `table` (n, dim) un-normalised item vectors (`_raw_items`);
        `hist` (batch, L) rows into it, newest first, -1 = padding. Returns (batch, dim),
        L2-normalised; a row without any history gets a zero vector."""
        length = hist.shape[1]
        x = table[hist.clamp(min=0)]  # (batch, L, dim)
        x = x + self.positions.weight[:length].unsqueeze(0)
        x = self.dropout(self.norm(x))
        pad = hist < 0  # (batch, L)
        empty = pad.all(dim=1)  # (batch,)
        # An empty row would attend to nothing (NaN); it keeps one dummy key and is zeroed below.
        pad = pad.clone()
        pad[empty, 0] = False
        if self.causal:
            # Newest first: position i may see itself and older items (j >= i), not newer ones.
            newer = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)  # (L, L) True = blocked
            heads = self.encoder.layers[0].self_attn.num_heads
            mask = newer.unsqueeze(0) | pad.unsqueeze(1)  # (batch, L, L)
            mask = mask & ~torch.eye(length, dtype=torch.bool, device=x.device)  # always see itself
            h = self.encoder(x, mask=mask.repeat_interleave(heads, dim=0))
        else:
            h = self.encoder(x, src_key_padding_mask=pad)  # (batch, L, dim)
        u = nn.functional.normalize(h[:, 0], dim=-1)  # (batch, dim): the newest position
        return u.masked_fill(empty.unsqueeze(1), 0.0)

    def forward(self, item_emb: torch.Tensor, item_ids: torch.Tensor, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's towers in one call (so DDP sees it): item_emb (n, text_dim) and
        item_ids (n,) of the items involved (the whole catalog under full softmax), hist
        (batch, L) rows into them. Returns users (batch, dim) and items (n, dim)."""
        raw = self._raw_items(item_emb, item_ids)  # (n, dim)
        return self.encode_user(raw, hist), nn.functional.normalize(raw, dim=-1)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class SequenceModel:
    """A trained sequence tower with its ID vocabulary, for ranking over a catalog."""

    def __init__(self, tower: SequenceTower, id_of: dict[str, int]) -> None:
        self.tower = tower.eval()
        self.id_of = id_of  # item id -> ID-embedding row (1-based; 0 = none)
        self.max_len = int(tower.settings["max_len"])

    def id_rows(self, item_ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.id_of.get(i, 0) for i in item_ids], dtype=torch.long)

    @torch.inference_mode()
    def item_vectors(self, text_emb: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """(items, dim) catalog vectors from the catalog's text embeddings, row-aligned."""
        out = self.tower.item_vectors(torch.from_numpy(np.ascontiguousarray(text_emb, dtype=np.float32)), self.id_rows(item_ids))
        return out.numpy()

    @torch.inference_mode()
    def encode_users(self, histories: Sequence[Sequence[int]], text_emb: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Users from their histories given as catalog rows (newest first; unknown items left out
        by the caller). (users, dim); a user without history gets a zero vector."""
        hist = self.history_rows(histories)
        rows = np.unique(hist[hist >= 0])
        local = np.full(hist.shape, -1, dtype=np.int64)
        local[hist >= 0] = np.searchsorted(rows, hist[hist >= 0])
        emb = torch.from_numpy(np.ascontiguousarray(text_emb[rows], dtype=np.float32))
        raw = self.tower._raw_items(emb, self.id_rows([item_ids[r] for r in rows]))  # (rows, dim)
        return self.tower.encode_user(raw, torch.from_numpy(local)).numpy()

    def history_rows(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(users, L) int64 rows, newest first, -1 padded, at most max_len per user."""
        length = max([min(len(h), self.max_len) for h in histories] + [1])
        out = np.full((len(histories), length), -1, dtype=np.int64)
        for u, h in enumerate(histories):
            h = list(h)[: self.max_len]
            out[u, : len(h)] = h
        return out


def save_sequence_tower(tower: SequenceTower, id_of: Mapping[str, int], out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"settings": tower.settings, "text_dim": tower.text_dim, "n_ids": tower.n_ids}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_file({k: v.detach().float().contiguous() for k, v in tower.state_dict().items()}, str(out / "model.safetensors"))
    (out / "items.json").write_text(json.dumps(dict(id_of)))
    export_program(tower, out / PROGRAM_FILE)


def export_program(tower: SequenceTower, path: str | Path) -> None:
    """The tower as a `torch.export` program (eval mode), loadable with plain torch:
    `torch.export.load(path).module()(item_emb, item_id_rows, hist) -> (users, items)`."""
    import copy

    model = copy.deepcopy(tower).eval()
    max_len = int(tower.settings["max_len"])
    n = torch.export.Dim("items", min=2)
    b = torch.export.Dim("users", min=1)
    length = torch.export.Dim("history", min=2, max=max(2, max_len))
    example = (torch.randn(3, tower.text_dim), torch.tensor([1 if tower.n_ids else 0, 0, 0]), torch.tensor([[0, 1], [-1, -1]]))
    with torch.no_grad():
        program = torch.export.export(model, example, dynamic_shapes=({0: n}, {0: n}, {0: b, 1: length}))
    torch.export.save(program, str(path))


def has_sequence_tower(model_dir: str | Path) -> bool:
    return (Path(model_dir) / SEQUENCE_DIR / "config.json").is_file()


def load_sequence_tower(model_dir: str | Path) -> SequenceModel:
    """The sequence tower of an export (its `sequence/` folder), on CPU, in eval mode."""
    from safetensors.torch import load_file

    d = Path(model_dir) / SEQUENCE_DIR
    missing = [f for f in _FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"sequence tower at {d} lacks {', '.join(missing)}")
    cfg = json.loads((d / "config.json").read_text())
    tower = SequenceTower(cfg["settings"], int(cfg["text_dim"]), int(cfg["n_ids"]))
    tower.load_state_dict(load_file(str(d / "model.safetensors")))
    return SequenceModel(tower, {k: int(v) for k, v in json.loads((d / "items.json").read_text()).items()})


def attach_sequence_tower(export_dir: str | Path, tower: SequenceTower, id_of: Mapping[str, int], **meta_extra: Any) -> str:
    """Add a sequence tower to a local export folder (written by `recsys.model.export_model`):
    `sequence/` beside the item encoder, `user_tower: sequence` in its RECSYS_META, and a new
    `model_id` over all weights (the tower's included) and the ID vocabulary. Returns the id."""
    import hashlib

    from recsys.encoder import RECSYS_META, model_identity

    root = Path(export_dir)
    meta_file = root / RECSYS_META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{root} is not an export (no {RECSYS_META})")
    save_sequence_tower(tower, id_of, root / SEQUENCE_DIR)
    meta = json.loads(meta_file.read_text())
    meta.update(meta_extra, user_tower="sequence")
    meta["sequence_items_sha256"] = hashlib.sha256((root / SEQUENCE_DIR / "items.json").read_bytes()).hexdigest()[:16]
    # Settings that change what the tower computes but not its weights' shapes (attention, say).
    meta["sequence_config_sha256"] = hashlib.sha256((root / SEQUENCE_DIR / "config.json").read_bytes()).hexdigest()[:16]
    meta.pop("model_id", None)
    meta["model_id"] = model_identity(root, meta)
    meta_file.write_text(json.dumps(meta, indent=2))
    return str(meta["model_id"])


def open_sequence_tower(uri: str, cfg: Any = None, model_id: str = "") -> SequenceModel | None:
    """The sequence tower of the export at a local path or object-store URI, or None when its
    RECSYS_META does not name one (`user_tower: sequence`; from the metadata, never from a
    folder's presence, as TextEncoder reads a projection). A remote export's `sequence/` folder
    alone is downloaded, loaded and its copy deleted (as recsys.encoder.open_encoder does).
    `model_id`: the identity the caller's catalog was made by; the export's is read again after
    loading, and a different one (re-exported meanwhile) is refused."""
    import tempfile

    from recsys import storage
    from recsys.encoder import RECSYS_META, resolve_model_path

    remote = storage.is_remote(uri)
    root = uri if remote else resolve_model_path(uri)
    meta_uri = storage.join(root, RECSYS_META) if remote else str(Path(root) / RECSYS_META)

    def meta() -> dict[str, Any]:
        if remote:
            return storage.read_json(meta_uri, cfg) if storage.exists(meta_uri, cfg) else {}
        return json.loads(Path(meta_uri).read_text()) if Path(meta_uri).is_file() else {}

    if meta().get("user_tower") != "sequence":
        found = str(meta().get("model_id") or "")
        if model_id and found and found != model_id:
            raise ValueError(f"the model at {uri} is now {found}, not {model_id}: it was replaced; deploy / run again")
        return None
    if remote:
        with tempfile.TemporaryDirectory(prefix="recsys-sequence-") as tmp:
            storage.download_dir(storage.join(root, SEQUENCE_DIR), Path(tmp) / SEQUENCE_DIR, cfg)
            model = load_sequence_tower(tmp)
    else:
        model = load_sequence_tower(root)
    found = str(meta().get("model_id") or "")
    if model_id and found != model_id:
        raise ValueError(f"the model at {uri} changed while loading its sequence tower ({model_id} -> {found or 'none'}): deploy / run again")
    log.info("sequence user tower of model %s loaded from %s", found, uri)
    return model


class SequenceCatalog:
    """A sequence tower bound to one catalog: its item vectors computed once from the catalog's
    text embeddings (the index's), and users ranked against them. The one implementation of
    "history -> ranked items" for the Serve app's Retriever and the batch job's Ranker; the top-k
    itself is recsys.retrieval.search, as on the text path."""

    def __init__(self, model: SequenceModel, text_emb: np.ndarray, item_ids: Sequence[str]) -> None:
        if text_emb.ndim != 2 or text_emb.shape[1] != model.tower.text_dim:
            raise ValueError(
                f"catalog embeddings of shape {text_emb.shape}, but the sequence tower reads item embeddings of dim "
                f"{model.tower.text_dim}: the index was not made by this export's item tower"
            )
        if len(item_ids) != len(text_emb):
            raise ValueError(f"{len(item_ids)} item ids for {len(text_emb)} catalog embeddings")
        self.model = model
        self.text_emb = text_emb  # (n_items, text_dim): the catalog's text embeddings
        self.item_ids = list(item_ids)
        self.vectors = model.item_vectors(text_emb, self.item_ids)  # (n_items, dim), L2-normalised

    def users(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(users, dim) user vectors from histories of catalog rows, newest first."""
        return self.model.encode_users(histories, self.text_emb, self.item_ids)

    def rank(
        self,
        histories: Sequence[Sequence[int]],
        k: int,
        keep: np.ndarray | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k catalog rows and scores per history (recsys.retrieval.search's contract)."""
        from recsys.retrieval import search

        return search(self.vectors, self.users(histories), k, keep, exclude)

    def score(self, history: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        """One user's scores for the catalog rows `rows`. (len(rows),)"""
        return self.vectors[list(rows)] @ self.users([history])[0]
