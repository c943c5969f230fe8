"""Where the inference stage writes: predictions, their parquet twin, skipped ROIs, part files.

Kept free of torch so that `status` and the driver can test completion in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutputFiles:
    csv: Path

    @property
    def parquet(self) -> Path:
        return self.csv.with_suffix(".parquet")

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
