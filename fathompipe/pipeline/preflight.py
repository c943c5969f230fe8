"""Checks before anything is queued: a doomed job is refused on the login node, not after a queue wait.

Every annotation file is read and validated once, and cut into the run's columnar table (annotation_table.py)
that every task reads; once the run has submitted work that table is fixed and a changed file is refused.
The directories the jobs write to must be writable; every stage's rendered sbatch script is checked by Slurm
itself (`sbatch --test-only`, which queues nothing), so an unknown partition, an impossible memory or GPU
request, a bad account or QOS is one message naming the stage, the key to change and where it was set (the
profile, or a key=value on the command line).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from fathompipe import annotation_table
from fathompipe.annotations import AnnotationError, load_coco
from fathompipe.config import Origins, PipelineConfig
from fathompipe.layout import RunPaths
from fathompipe.pipeline.state import RunState, RunStateError
from fathompipe.pipeline.scheduler import max_array_size, render_sbatch, sbatch_test_only
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


def has_submitted(paths: RunPaths) -> bool:
    """Whether any job of the run was ever submitted (a damaged run.json counts as yes)."""
    try:
        state = RunState.load(paths)
    except RunStateError:
        return True
    return state is not None and bool(state.all_job_ids())


def check_annotations(cfg: PipelineConfig, paths: RunPaths, origins: Origins, write: bool) -> List[str]:
    """Each selected split's annotation file validated and, with `write`, cut into the run's table. A table the
    run's jobs already use is never re-cut: its file is only checked to be unchanged (no parse)."""
    errors: List[str] = []
    fixed = has_submitted(paths)
    for split in cfg.data.splits:
        key, json_path, table = f"data.{split}.annotations", Path(getattr(cfg.data, split).annotations), \
            paths.annotation_table(split)
        meta = annotation_table.read_meta(table)
        if meta is not None:
            why = annotation_table.changed(table, json_path)
            if why and fixed:
                errors.append(f"{origins.where(key)}: {key}: {why}. This run's jobs use the shards cut at its first "
                              f"submit: restore the file, or submit into a new --run-dir")
            if fixed or (why is None and meta["num_shards"] == cfg.download.num_shards):
                continue
        try:
            coco = load_coco(json_path)
        except AnnotationError as exc:
            errors.append(f"{origins.where(key)}: {key}: {exc}")
            continue
        if write:
            annotation_table.write_table(coco, table, cfg.download.num_shards)
    return errors


def check_inputs(cfg: PipelineConfig, paths: RunPaths, origins: Origins, write_tables: bool = False) -> List[str]:
    """Annotation files validated (and cut into the run's tables with `write_tables`); images, checkpoint and run
    directories writable."""
    errors = check_annotations(cfg, paths, origins, write_tables)
    for split in cfg.data.splits:
        data = getattr(cfg.data, split)
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
        script = render_sbatch(stage.resources(cfg), job_name(paths.root, stage.name), paths.logs(stage.name),
                               min(n, max_array_size()), comment=job_comment(paths.root))  # the largest array
        why = sbatch_test_only(script)
        if why:
            fix = refusal_fix(stage.name, why, origins)
            errors.append(f"stage {stage.name}: Slurm refuses its job: {why}. {fix[0].upper()}{fix[1:]}.")
    return errors


def preflight(cfg: PipelineConfig, paths: RunPaths, origins: Origins, counts: Optional[Dict[str, int]] = None,
              write_tables: bool = False) -> List[str]:
    """Every reason the run cannot work, found before queueing; [] when it can be submitted.

    `counts`: stage -> tasks about to be submitted (default: every task of every stage, a new run).
    `write_tables`: cut each annotation file into the run's table as it is read (submit, not --dry-run).
    """
    errors = check_inputs(cfg, paths, origins, write_tables)
    if cfg.cluster == "slurm":
        all_tasks = {s.name: len(s.tasks(cfg, paths)) for s in STAGES}
        errors += check_scripts(cfg, paths, origins, all_tasks if counts is None else counts)
    return errors
