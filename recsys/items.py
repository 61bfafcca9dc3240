"""The item table: prepare's items parquet (one row per catalog item, `ITEMS_SCHEMA`: item_id,
text, dup_group, popularity, title / brand / category / price) and the per-item lookups built
from it.

Training (features, hard negatives), evaluation, the sequence tower, the batch job and the Serve
replicas all read the catalog through `read_items`, and training's lookups are `ItemTable`, so
an item's row, text, duplicate group and sampling probability mean the same thing everywhere.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys import storage
from recsys.losses import item_key

if TYPE_CHECKING:
    from recsys.config import Config, StorageConfig

log = logging.getLogger(__name__)

REQUIRED = ("item_id", "text")


def read_items(uri: str, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """The items table at `uri`: a folder of parquet parts (prepare writes one) or one parquet
    file, local or in an object store. Refused, naming the file and the item, when it is missing,
    lacks `item_id` / `text`, or lists an item twice (every consumer keys by item id)."""
    fs, path = storage.filesystem(uri, storage_cfg)
    one_file = fs.get_file_info(path).type == pafs.FileType.File
    table = pq.read_table(path, filesystem=fs) if one_file else storage.read_parquet_dir(uri, storage_cfg)
    if table is None:
        raise FileNotFoundError(f"no items table at {uri}: run the prepare job first (or point serve.items_uri at one)")
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"the items table at {uri} lacks the column(s) {missing}; it has {table.column_names}")
    ids = table.column("item_id")
    if ids.null_count:
        raise ValueError(f"the items table at {uri} has {ids.null_count} row(s) without an item_id")
    counts = pc.value_counts(ids)
    twice = [str(v["values"]) for v in counts.to_pylist() if v["counts"] > 1]
    if twice:
        raise ValueError(f"the items table at {uri} lists {len(twice)} item id(s) more than once, e.g. {twice[:5]}")
    return table


class ItemTable:
    """Per-item lookups by catalog row: text, hashed key, duplicate group, log sampling
    probability (popularity + 1, normalised). Row order is the table's."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.ids: list[str] = table.column("item_id").to_pylist()
        self.texts: list[str] = table.column("text").to_pylist()
        missing = [c for c in ("dup_group", "popularity") if c not in table.column_names]
        if missing:
            raise ValueError(f"the items table lacks {missing} (prepare's ITEMS_SCHEMA): training's lookups need them")
        dups = table.column("dup_group").to_numpy()
        pop = table.column("popularity").to_numpy().astype(np.float64) + 1.0
        self.index = {i: r for r, i in enumerate(self.ids)}
        self.keys = np.array([item_key(i) for i in self.ids], dtype=np.int64)
        self.dups = dups.astype(np.int64)
        self.logq = np.log(pop / pop.sum()).astype(np.float32)

    @classmethod
    def load(cls, cfg: Config) -> ItemTable:
        from recsys import paths

        return cls(read_items(paths.items(cfg), cfg.storage))

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, item_ids: list[str], where: str) -> np.ndarray:
        missing = [i for i in item_ids if i not in self.index]
        if missing:
            raise KeyError(f"{where}: item ids {missing[:5]} are not in the items table")
        return np.array([self.index[i] for i in item_ids], dtype=np.int64)

    def text_of(self) -> dict[str, Any]:
        return dict(zip(self.ids, self.texts, strict=True))
