"""The stage graph: which tasks each stage has, what it runs after, and what it asks Slurm for.

A task is a picklable callable with a stable `key` and a `done()` test read from its completion
marker, so the driver, status and resubmit all agree on what is finished. Adding a stage is one
`Stage(...)` entry in `STAGES` plus its task class.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Protocol, Tuple

import submitit

from fathompipe.config import PipelineConfig, Resources, SplitSource
from fathompipe.jobs import CheckpointJob, DownloadJob, EvaluateJob, EvaluateSplit, InferJob
from fathompipe.layout import OutputFiles, RunPaths, ShardFiles, evaluate_marker
from fathompipe.model.slim import slim_is_current

REPORT_PAGE = "report.html"  # what the evaluate stage writes first in each split's report directory


class Task(Protocol):
    key: str

    def done(self) -> bool: ...

    def progress(self) -> Dict[str, int]: ...

    def __call__(self) -> object: ...


class StageFailed(RuntimeError):
    """A task ended with work left; the message says what and how to retry."""


@dataclass(frozen=True)
class DownloadTask:
    job: DownloadJob

    @property
    def key(self) -> str:
        return f"{self.job.source.split}/{self.job.shard}"

    @property
    def files(self) -> ShardFiles:
        return ShardFiles.of(str(self.job.state_dir), str(self.job.name), self.job.shard, self.job.options.num_shards)

    def done(self) -> bool:
        return self.files.marker.exists()

    def progress(self) -> Dict[str, int]:
        counts = {"ok": 0, "missing": 0, "failed": 0}
        for rec in self.files.load_records().values():
            counts[rec.status] = counts.get(rec.status, 0) + 1
        return counts

    def causes(self) -> Dict[str, int]:
        """Why images of this shard failed: error -> count (e.g. `HTTP 503`: 9)."""
        return dict(Counter(rec.error for rec in self.files.load_records().values() if rec.status == "failed"))

    def __call__(self) -> Dict[str, int]:
        from fathompipe.download import download_shard
        summary = download_shard(self.job, progress=True)
        if not summary.complete:
            causes = Counter(self.causes()).most_common(3)
            why = "; causes: " + ", ".join(f"{c} x{n}" for c, n in causes) if causes else ""
            raise StageFailed(f"{summary.line()}{why}; records: {self.files.records}")
        return {"ok": summary.ok, "missing": summary.missing}


def split_source(cfg: PipelineConfig, paths: RunPaths, split: str) -> SplitSource:
    """A split's inputs as the run's tasks read them: the annotation table submit cut from its file, so no task
    parses the (at MBARI's size, 440 MB) annotation file again."""
    return replace(cfg.data.source(split), annotations=str(paths.annotation_table(split)))


def download_tasks(cfg: PipelineConfig, paths: RunPaths) -> List[Task]:
    return [DownloadTask(DownloadJob(split_source(cfg, paths, split), cfg.download, shard,
                                     str(paths.shard_files(split, shard, cfg.download.num_shards).state_dir), split))
            for split in cfg.data.splits for shard in range(cfg.download.num_shards)]


@dataclass(frozen=True)
class CheckpointTask:
    job: CheckpointJob
    key: str = "checkpoint"

    def done(self) -> bool:
        return slim_is_current(Path(self.job.options.path), self.job.encoder_config)

    def progress(self) -> Dict[str, int]:
        return {"slim": int(self.done())}

    def __call__(self) -> str:
        from fathompipe.checkpoint import run
        return str(run(self.job).weights)


@dataclass(frozen=True)
class InferTask(submitit.helpers.Checkpointable):
    """Requeued by submitit at its time limit or on preemption; finished batches are on disk."""

    job: InferJob

    @property
    def key(self) -> str:
        return f"{self.job.source.split}/{self.job.shard}"

    def done(self) -> bool:
        out = OutputFiles(Path(self.job.output))
        return out.shard_marker(self.job.shard, self.job.options.shards).exists() and out.csv.exists()

    def progress(self) -> Dict[str, int]:
        return {"batches": len(OutputFiles(Path(self.job.output)).shard_parts(self.job.shard))}

    def __call__(self) -> object:
        from fathompipe.infer import run
        return run(self.job)


def checkpoint_tasks(cfg: PipelineConfig, paths: RunPaths) -> List[Task]:
    return [CheckpointTask(CheckpointJob(cfg.checkpoint, cfg.infer.encoder_config))]


def infer_tasks(cfg: PipelineConfig, paths: RunPaths) -> List[Task]:
    return [InferTask(InferJob(split_source(cfg, paths, split), cfg.checkpoint.path, str(paths.predictions(split).csv),
                               cfg.infer, shard))
            for split in cfg.data.splits for shard in range(cfg.infer.shards)]


@dataclass(frozen=True)
class EvaluateTask:
    """ONE task for every selected split (EvaluateJob says why). Holds no API key: deployments are read in the job."""

    job: EvaluateJob

    @property
    def key(self) -> str:
        return "+".join(s.split for s in self.job.splits)

    def done(self) -> bool:
        return all(evaluate_marker(s.report_dir).exists() for s in self.job.splits)

    def progress(self) -> Dict[str, int]:
        """Reports written, whether or not the FiftyOne import after them (and so `done`) went through."""
        return {"reports": sum((Path(s.report_dir) / REPORT_PAGE).exists() for s in self.job.splits)}

    def __call__(self) -> object:
        from fathompipe.evaluate import run_job
        return run_job(self.job)


def evaluate_tasks(cfg: PipelineConfig, paths: RunPaths) -> List[Task]:
    splits = tuple(EvaluateSplit.of(split_source(cfg, paths, split), str(paths.predictions(split).parquet),
                                    str(paths.report_dir(split)))
                   for split in cfg.data.splits)
    return [EvaluateTask(EvaluateJob(splits, cfg.evaluate))]


@dataclass(frozen=True)
class Stage:
    name: str
    after: Tuple[str, ...]
    resources: Callable[[PipelineConfig], Resources]
    tasks: Callable[[PipelineConfig, RunPaths], List[Task]]


STAGES: List[Stage] = [
    Stage("download", (), lambda c: c.download.resources, download_tasks),
    Stage("checkpoint", (), lambda c: c.checkpoint.resources, checkpoint_tasks),
    Stage("infer", ("download", "checkpoint"), lambda c: c.infer.resources, infer_tasks),
    Stage("evaluate", ("infer",), lambda c: c.evaluate.resources, evaluate_tasks),
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


STAGE_CODES = {"download": "dl", "checkpoint": "ck", "infer": "in", "evaluate": "ev"}


def job_name(run_root: Path, stage: str) -> str:
    """`<stage code>.<run>`, e.g. `dl.fathomnet2025`: squeue's default 8-character NAME column shows the stage and
    the first 5 characters of the run's name (`dl.fatho`), so two runs' jobs are told apart there; `squeue -O
    name:30` shows the whole name and `comment` the run directory."""
    return f"{STAGE_CODES.get(stage, stage)}.{run_root.name}"


def job_comment(run_root: Path) -> str:
    """`fathompipe:<run dir>`: which run a job belongs to (`squeue -O jobid,name,comment`); no blanks,
    which an `#SBATCH` line would split on."""
    return "fathompipe:" + "".join("_" if c.isspace() else c for c in str(run_root))
