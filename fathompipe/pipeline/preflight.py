"""Checks before anything is queued: a doomed job is refused on the login node, not after a queue wait.

Every annotation file goes through the same reader and checks the download task uses; the directories
the jobs write to must be writable; every stage's rendered sbatch script is checked by Slurm itself
(`sbatch --test-only`, which queues nothing), so an unknown partition, an impossible memory or GPU
request, a bad account or QOS is one message naming the stage, the key to change and where it was set (the
profile, or a key=value on the command line).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from fathompipe.annotations import AnnotationError, load_coco
from fathompipe.config import Origins, PipelineConfig
from fathompipe.layout import RunPaths
from fathompipe.pipeline.scheduler import render_sbatch, sbatch_test_only
from fathompipe.pipeline.graph import STAGES, job_comment, job_name
from fathompipe.pipeline.submission import refusal_fix


def unwritable(path: Path) -> Optional[str]:
    """None when `path` is (or can be made as) a writable directory, else why not."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by {os.environ.get('USER', 'this user')}"
    return None


def check_inputs(cfg: PipelineConfig, paths: RunPaths, origins: Origins) -> List[str]:
    """Annotation files fully validated; images, checkpoint and run directories writable."""
    errors: List[str] = []
    for split in cfg.data.splits:
        data = getattr(cfg.data, split)
        key = f"data.{split}.annotations"
        try:
            load_coco(data.annotations)
        except AnnotationError as exc:
            errors.append(f"{origins.where(key)}: {key}: {exc}")
        key = f"data.{split}.images_dir"
        why = unwritable(Path(data.images_dir))
        if why:
            errors.append(f"{origins.where(key)}: {key}={data.images_dir!r}: {why}")
    ckpt = Path(cfg.checkpoint.path)
    why = unwritable(ckpt.parent)
    if why:
        errors.append(f"{origins.where('checkpoint.path')}: checkpoint.path={cfg.checkpoint.path!r}: the checkpoint "
                      f"and its slim files are written beside it: {why}")
    why = unwritable(paths.root)
    if why:
        errors.append(f"{origins.where('run_dir')}: run_dir={cfg.run_dir!r}: {why}")
    return errors


def check_scripts(cfg: PipelineConfig, paths: RunPaths, origins: Origins, counts: Dict[str, int]) -> List[str]:
    """Slurm's verdict on the script of each stage about to get `counts[stage]` tasks (without its dependency,
    which names no job yet)."""
    errors: List[str] = []
    for stage in STAGES:
        n = counts.get(stage.name, 0)
        if not n:
            continue
        script = render_sbatch(stage.resources(cfg), job_name(paths.root, stage.name), paths.logs(stage.name), n,
                               comment=job_comment(paths.root))
        why = sbatch_test_only(script)
        if why:
            fix = refusal_fix(stage.name, why, origins)
            errors.append(f"stage {stage.name}: Slurm refuses its job: {why}. {fix[0].upper()}{fix[1:]}.")
    return errors


def preflight(cfg: PipelineConfig, paths: RunPaths, origins: Origins,
              counts: Optional[Dict[str, int]] = None) -> List[str]:
    """Every reason the run cannot work, found before queueing; [] when it can be submitted.

    `counts`: stage -> tasks about to be submitted (default: every task of every stage, a new run).
    """
    errors = check_inputs(cfg, paths, origins)
    if cfg.cluster == "slurm":
        all_tasks = {s.name: len(s.tasks(cfg, paths)) for s in STAGES}
        errors += check_scripts(cfg, paths, origins, all_tasks if counts is None else counts)
    return errors
