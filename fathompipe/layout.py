"""Every path and completion marker of a run, in one module (the idea of submitit's JobPaths).

    RUN/config.yaml, run.json, .lock          the resolved configuration and what was submitted (RunPaths)
    RUN/logs/<stage>/                         submitit's scripts, pickles and logs
    RUN/annotations/<split>/                  the split's annotation file parsed once, as columns (annotation_table)
    RUN/download/<split>-<shard>-of-<n>.jsonl one record per image; `.done` beside it when the shard is finished
    RUN/infer/<split>/predictions.csv         and .parquet, .embeddings.npy, .skipped.csv, .parts/ (OutputFiles)
    RUN/evaluate/<split>/evaluate.done        after the report and the FiftyOne import (evaluate_marker)
    <checkpoint>.inference.safetensors/.json  the slim weights beside the checkpoint (SlimFiles)

The stages write here, and status, resubmit, cancel and the demo read here. Free of torch, so that completion
is tested in milliseconds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from fathompipe.fetch.records import ImageRecord

EVALUATE_DONE = "evaluate.done"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunPaths":
        return cls(Path(run_dir).expanduser().resolve())

    @property
    def config(self) -> Path:
        """The resolved configuration, secrets redacted."""
        return self.root / "config.yaml"

    @property
    def run_json(self) -> Path:
        """Stages, job ids, task keys and every (re)submission."""
        return self.root / "run.json"

    @property
    def damaged_run_json(self) -> Path:
        """Where a lost or damaged run.json is kept when the state is rebuilt from the markers."""
        return self.root / "run.json.damaged"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def logs(self, stage: str) -> Path:
        """submitit's folder for a stage: sbatch scripts, pickles and `%A_%a` logs."""
        return self.root / "logs" / stage

    def state(self, stage: str) -> Path:
        """Per-task records and completion markers of a stage."""
        return self.root / stage

    def annotation_table(self, split: str) -> Path:
        """The split's annotation file as the run's tasks read it: parsed once at submit (annotation_table.py)."""
        return self.root / "annotations" / split

    def shard_files(self, split: str, shard: int, num_shards: int) -> "ShardFiles":
        return ShardFiles.of(self.state("download"), split, shard, num_shards)

    def predictions(self, split: str) -> "OutputFiles":
        return OutputFiles(self.state("infer") / split / "predictions.csv")

    def report_dir(self, split: str) -> Path:
        return self.state("evaluate") / split


def evaluate_marker(report_dir: str | Path) -> Path:
    """Written last by the evaluate stage for one split: the report and the FiftyOne import are complete."""
    return Path(report_dir) / EVALUATE_DONE


@dataclass(frozen=True)
class ShardFiles:
    """Where a download shard's records and completion marker live."""

    state_dir: Path
    key: str

    @classmethod
    def of(cls, state_dir: str | Path, name: str, shard: int, num_shards: int) -> "ShardFiles":
        return cls(Path(state_dir), f"{name}-{shard:05d}-of-{num_shards:05d}")

    @property
    def records(self) -> Path:
        return self.state_dir / f"{self.key}.jsonl"

    @property
    def marker(self) -> Path:
        return self.state_dir / f"{self.key}.done"

    def load_records(self) -> Dict[int, ImageRecord]:
        records: Dict[int, ImageRecord] = {}
        if self.records.exists():
            for line in self.records.read_text().splitlines():
                try:
                    rec = ImageRecord(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # a line cut by a kill; the image is simply re-checked
                records[rec.image_id] = rec
        return records


@dataclass(frozen=True)
class OutputFiles:
    """Where the inference stage writes: predictions, their parquet twin, embeddings, skipped ROIs, parts."""

    csv: Path

    @property
    def parquet(self) -> Path:
        return self.csv.with_suffix(".parquet")

    @property
    def embeddings(self) -> Path:
        """Row i: the embedding of the ROI in row i of the parquet (fathompipe/embeddings.py)."""
        return self.csv.with_name(self.csv.stem + ".embeddings.npy")

    @property
    def legacy_embeddings(self) -> Path:
        """Where runs of an earlier version wrote the embeddings (with their annotation ids); still read."""
        return self.csv.with_name(self.csv.stem + ".embeddings.npz")

    @property
    def skipped(self) -> Path:
        return self.csv.with_name(self.csv.stem + ".skipped.csv")

    @property
    def parts(self) -> Path:
        return self.csv.with_name(self.csv.stem + ".parts")

    def part(self, shard: int, index: int) -> Path:
        return self.parts / f"shard{shard:03d}-batch{index:06d}.npz"

    def shard_parts(self, shard: int) -> List[Path]:
        """The batches of one shard finished so far."""
        return sorted(self.parts.glob(f"shard{shard:03d}-batch*.npz"))

    def all_parts(self) -> List[Path]:
        return sorted(self.parts.glob("shard*-batch*.npz"))

    @property
    def merge_lock(self) -> Path:
        return self.parts / ".merge.lock"

    def shard_marker(self, shard: int, num_shards: int) -> Path:
        return self.parts / f"shard{shard:03d}-of-{num_shards:03d}.done"


@dataclass(frozen=True)
class SlimFiles:
    """The checkpoint stage's output and completion: slim inference weights and their metadata beside the .ckpt."""

    weights: Path
    meta: Path

    @classmethod
    def beside(cls, checkpoint: Path) -> "SlimFiles":
        stem = checkpoint.name.removesuffix(".ckpt")
        return cls(checkpoint.with_name(f"{stem}.inference.safetensors"),
                   checkpoint.with_name(f"{stem}.inference.json"))

    @classmethod
    def of_weights(cls, weights: Path) -> "SlimFiles":
        """The slim files when the user points at the .safetensors itself."""
        return cls(weights, weights.with_suffix(".json"))
