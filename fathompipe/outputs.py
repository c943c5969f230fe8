"""Where the inference stage writes: predictions, their parquet twin, embeddings, skipped ROIs, parts.

Kept free of torch so that `status` and the driver can test completion in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Tuple

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class OutputFiles:
    csv: Path

    @property
    def parquet(self) -> Path:
        return self.csv.with_suffix(".parquet")

    @property
    def embeddings(self) -> Path:
        return self.csv.with_name(self.csv.stem + ".embeddings.npz")

    @property
    def skipped(self) -> Path:
        return self.csv.with_name(self.csv.stem + ".skipped.csv")

    @property
    def parts(self) -> Path:
        return self.csv.with_name(self.csv.stem + ".parts")

    def part(self, shard: int, index: int) -> Path:
        return self.parts / f"shard{shard:03d}-batch{index:06d}.npz"

    def shard_marker(self, shard: int, num_shards: int) -> Path:
        return self.parts / f"shard{shard:03d}-of-{num_shards:03d}.done"


def load_embeddings(path: str | Path) -> Tuple["np.ndarray", "np.ndarray"]:
    """(annotation_id (N,) int64 ascending, embeddings (N, D) float32) from OUT.embeddings.npz."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embeddings {path} do not exist (the infer stage writes them beside its predictions)")
    with np.load(path) as z:
        if not {"annotation_id", "embeddings"} <= set(z.files):
            raise ValueError(f"{path}: expected arrays annotation_id and embeddings, found {sorted(z.files)}")
        ids, emb = z["annotation_id"], z["embeddings"]
    if emb.ndim != 2 or len(ids) != len(emb):
        raise ValueError(f"{path}: embeddings of shape {emb.shape} do not match {len(ids)} annotation ids")
    return ids, emb
