"""What one task of each stage runs: its configuration sections and its place in the run, as one typed object.

The driver pickles these inside its tasks, and each stage's command line is generated from them (fathompipe.cli),
so a new option is one field in fathompipe/config.py and the code that reads it. Free of torch and aiohttp.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from fathompipe.config import (NAMINGS, SPLITS, CheckpointConfig, DownloadConfig, EvaluateConfig, InferConfig,
                               SplitSource)


@dataclass(frozen=True)
class DownloadJob:
    """One shard of one split's images (`options.num_shards` shards in all)."""

    source: SplitSource
    options: DownloadConfig = field(default_factory=DownloadConfig)
    shard: int = field(default=0, metadata={"help": "default: $SLURM_ARRAY_TASK_ID"})
    state_dir: Optional[str] = field(default=None, metadata={"help": "records and markers "
                                                             "(default: IMAGES_DIR/.fathompipe)"})
    name: Optional[str] = field(default=None, metadata={"help": "shard file prefix "
                                                        "(default: the annotation file's stem)"})


@dataclass(frozen=True)
class CheckpointJob:
    """Get and verify the checkpoint and export its slim weights (for the encoder the inference stage uses)."""

    options: CheckpointConfig = field(default_factory=CheckpointConfig)
    encoder_config: Optional[str] = field(default=None, metadata={"help": "Dinov2Config fields as JSON "
                                                                  "(head count etc.)"})


@dataclass(frozen=True)
class InferJob:
    """One shard (of `options.shards`) of one split's ROIs; the last shard to finish merges them."""

    source: SplitSource
    checkpoint: str = field(metadata={"help": "Lightning .ckpt or its .inference.safetensors"})
    output: str = field(metadata={"help": "OUT.csv; OUT.parquet is written beside it"})
    options: InferConfig = field(default_factory=InferConfig)
    shard: int = 0


@dataclass(frozen=True)
class EvaluateSplit:
    """One split to score and import: its annotations, the infer stage's predictions, where its report goes.
    Its own fields rather than a SplitSource: the report needs no images (crops are drawn only when they exist)."""

    annotations: str = field(metadata={"help": "FathomNet COCO json of the split"})
    predictions: str = field(metadata={"help": "predictions.csv or predictions.parquet"})
    report_dir: str = field(metadata={"help": "report.html, metrics.json, the CSVs and evaluate.done"})
    split: str = field(default="test", metadata={"choices": SPLITS})
    images_dir: Optional[str] = field(default=None, metadata={"help": "for crops in the report and FiftyOne's "
                                                              "file paths"})
    naming: str = field(default="file_name", metadata={"choices": NAMINGS})

    @classmethod
    def of(cls, source: SplitSource, predictions: str, report_dir: str) -> "EvaluateSplit":
        return cls(source.annotations, predictions, report_dir, source.split, source.images_dir, source.naming)


@dataclass(frozen=True)
class EvaluateJob:
    """ONE task for every selected split, evaluated in turn: parallel tasks would each start FiftyOne's bundled
    mongod on the same directory (the second fails). Each split keeps its report directory and `evaluate.done`."""

    splits: Tuple[EvaluateSplit, ...]
    options: EvaluateConfig = field(default_factory=EvaluateConfig)
