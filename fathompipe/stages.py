"""The stage graph: which tasks each stage has, what it runs after, and what it asks Slurm for.

A task is a picklable callable with a stable `key` and a `done()` test read from its completion
marker, so the driver, status and resubmit all agree on what is finished. Adding a stage is one
`Stage(...)` entry in `STAGES` plus its task class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Protocol, Tuple

from .config import PipelineConfig, Resources
from .download import DownloadOptions, ShardFiles, download_shard
from .paths import RunPaths


class Task(Protocol):
    key: str

    def done(self) -> bool: ...

    def progress(self) -> Dict[str, int]: ...

    def __call__(self) -> object: ...


class StageFailed(RuntimeError):
    """A task ended with work left; the message says what and how to retry."""


@dataclass(frozen=True)
class DownloadTask:
    split: str
    annotations: str
    images_dir: str
    shard: int
    num_shards: int
    state_dir: str
    options: DownloadOptions

    @property
    def key(self) -> str:
        return f"{self.split}/{self.shard}"

    @property
    def files(self) -> ShardFiles:
        return ShardFiles.of(self.state_dir, self.split, self.shard, self.num_shards)

    def done(self) -> bool:
        return self.files.marker.exists()

    def progress(self) -> Dict[str, int]:
        counts = {"ok": 0, "missing": 0, "failed": 0}
        for rec in self.files.load_records().values():
            counts[rec.status] = counts.get(rec.status, 0) + 1
        return counts

    def __call__(self) -> Dict[str, int]:
        summary = download_shard(self.annotations, self.images_dir, self.shard, self.num_shards, self.state_dir,
                                 self.split, self.options, progress=True)
        if not summary.complete:
            raise StageFailed(f"{summary.line()}; records: {self.files.records}")
        return {"ok": summary.ok, "missing": summary.missing}


def download_tasks(cfg: PipelineConfig, paths: RunPaths) -> List[Task]:
    options = DownloadOptions.from_config(cfg.download)
    tasks: List[Task] = []
    for split in cfg.data.splits:
        data = getattr(cfg.data, split)
        for shard in range(cfg.download.num_shards):
            tasks.append(DownloadTask(split, data.annotations, data.images_dir, shard, cfg.download.num_shards,
                                      str(paths.state("download")), options))
    return tasks


@dataclass(frozen=True)
class Stage:
    name: str
    after: Tuple[str, ...]
    resources: Callable[[PipelineConfig], Resources]
    tasks: Callable[[PipelineConfig, RunPaths], List[Task]]
    progress_unit: str  # what status counts for this stage


STAGES: List[Stage] = [
    Stage("download", (), lambda c: c.download.resources, download_tasks, "images"),
]


def stage_by_name(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def downstream(name: str) -> List[Stage]:
    """Stages that (transitively) run after `name`, in graph order."""
    found = {name}
    out: List[Stage] = []
    for stage in STAGES:
        if found.intersection(stage.after):
            found.add(stage.name)
            out.append(stage)
    return out


def job_name(run_root: Path, stage: str) -> str:
    """`fp-<run>-<stage>`: readable in squeue next to the array index."""
    return f"fp-{run_root.name}-{stage}"
