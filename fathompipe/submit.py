"""Submit the pipeline: `python -m fathompipe.submit [--profile P] [--run-dir R] [--cluster C] [--dry-run] [k=v ...]`.

Nothing is queued unless pre-flight passes (annotation files, writable directories, every stage's
script accepted by `sbatch --test-only`); `--dry-run` prints the scripts and runs the same checks.
A second submit into the same run directory resumes: unfinished tasks whose jobs are not queued or
running are submitted, chained onto the ones that are; the configuration must be the same, except the
`resources` of stages without finished work. After a stage's sbatch is refused, fix the profile and
run the same submit command again. A run whose
run.json was lost or damaged is refused; `--rebuild-state` rebuilds it from the completion markers
on disk (only when the scheduler shows no job of the run) and resumes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List


from fathompipe import atomic
from fathompipe.cli import quiet_pipe
from fathompipe.config import ConfigError, Origins, PipelineConfig, load_config, origins, to_yaml
from fathompipe.layout import RunPaths
from fathompipe.pipeline.commands import fathompipe
from fathompipe.pipeline.graph import STAGES, job_comment, job_name
from fathompipe.pipeline.preflight import check_scripts, preflight
from fathompipe.pipeline.scheduler import queued_jobs_under, render_sbatch
from fathompipe.pipeline.state import RunState, RunStateError
from fathompipe.pipeline.submission import (Request, SubmitError, adopt_config, run_lock, submission_counts,
                                            submit_stages)

ALL = [s.name for s in STAGES]


def _rebuilt_state(cfg: PipelineConfig, paths: RunPaths, config_yaml: str) -> RunState:
    """A fresh state for a run whose run.json is lost or damaged (kept aside as run.json.damaged).

    Safe only when no job of the run can still write: the scheduler is asked for jobs whose
    submitit folder lies in the run directory. Completion markers then tell what is finished.
    """
    try:
        live = queued_jobs_under(cfg.cluster, paths.root)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SubmitError(f"cannot list the queue to check for jobs of this run ({exc}); not rebuilding") from None
    if live:
        raise SubmitError(f"refusing to rebuild {paths.run_json}: job(s) {', '.join(live[:5])} of this run are "
                          f"still queued or running. Wait for them (squeue) or cancel them (scancel), then rerun "
                          f"this command.")
    if paths.run_json.exists():
        os.replace(paths.run_json, paths.damaged_run_json)
    if not paths.config.exists():
        atomic.write_text(paths.config, config_yaml)
    state = RunState(cluster=cfg.cluster)
    state.log("rebuild-state")
    print(f"rebuilt the state of {paths.root} from its completion markers (no job of the run is queued or running)")
    return state


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="job profile YAML, e.g. jobs/pace.yaml (default: built-in defaults)")
    parser.add_argument("--run-dir", help="run directory (overrides run_dir)")
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], help="overrides cluster")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
    parser.add_argument("--rebuild-state", action="store_true",
                        help="run.json lost or damaged: rebuild it from the completion markers on disk and resume")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _dry_run(cfg: PipelineConfig, paths: RunPaths) -> None:
    """Print the sbatch script of every stage (dependencies as placeholders: no job id exists yet)."""
    for stage in STAGES:
        n = len(stage.tasks(cfg, paths))
        dep = "afterok:<" + ",".join(stage.after) + " job ids>" if stage.after else ""
        print(f"# ---- stage {stage.name}: {n} task(s) ----")
        print(render_sbatch(stage.resources(cfg), job_name(paths.root, stage.name), paths.logs(stage.name), n, dep,
                            comment=job_comment(paths.root)))


def _open_run(cfg: PipelineConfig, paths: RunPaths, origin: Origins, rebuild: bool) -> tuple[RunState, str]:
    """The run's state and why it is submitted now: a new run (state saved before the first sbatch, so a refusal
    leaves a reusable run directory), a resume (same configuration, scripts checked by Slurm), or a rebuild."""
    config_yaml = to_yaml(cfg)
    try:
        state = RunState.load(paths)
    except RunStateError:
        if not rebuild:
            raise
        state = _rebuilt_state(cfg, paths, config_yaml)
    if state is None:
        state = RunState(cluster=cfg.cluster)
        atomic.write_text(paths.config, config_yaml)
        state.save(paths)
        print(f"new run in {paths.root} (cluster: {cfg.cluster})")
        return state, "submit"
    adopt_config(cfg, paths, state, config_yaml, print)
    errors = check_scripts(cfg, paths, origin, submission_counts(cfg, paths, state, ALL)) \
        if cfg.cluster == "slurm" else []
    if errors:
        raise SubmitError("nothing was submitted:\n  " + "\n  ".join(errors))
    print(f"resuming {paths.root}: only unfinished tasks that are not queued or running are submitted")
    return state, "resume"


def _local_outcome(cfg: PipelineConfig, paths: RunPaths) -> int:
    """Local runs are finished when submit returns: say whether everything is done."""
    unfinished = [f"{s.name} {t.key}" for s in STAGES for t in s.tasks(cfg, paths) if not t.done()]
    if unfinished:
        print(f"error: unfinished: {', '.join(unfinished[:5])}; "
              f"see {fathompipe('status', '--run-dir', str(paths.root))}", file=sys.stderr)
        return 1
    return 0


def _refused(errors: List[str]) -> int:
    print("error: nothing was submitted:\n  " + "\n  ".join(errors), file=sys.stderr)
    return 1


def main(argv: List[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    overrides = [*args.overrides, *([f"run_dir={args.run_dir}"] if args.run_dir else []),
                 *([f"cluster={args.cluster}"] if args.cluster else [])]
    try:
        cfg = load_config(args.profile, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths, origin = RunPaths.of(cfg.run_dir), origins(args.profile, overrides)
    if args.dry_run:
        _dry_run(cfg, paths)
        errors = preflight(cfg, paths, origin, None, write_tables=False)
        if errors:
            return _refused(errors)
        print("# pre-flight passed: annotations valid, directories writable"
              + (", every script accepted by sbatch --test-only" if cfg.cluster == "slurm" else ""))
        return 0
    retry = ["submit", *[w for w in words if w != "--rebuild-state"]]
    try:
        with run_lock(paths):  # a second submit into this run is refused: the tables are cut under the lock
            # a resume's scripts are checked in _open_run, for the tasks it will submit
            errors = preflight(cfg, paths, origin, {} if paths.run_json.exists() else None, write_tables=True)
            if errors:
                return _refused(errors)
            state, reason = _open_run(cfg, paths, origin, args.rebuild_state)
            state.log(reason)
            submit_stages(cfg, paths, state, Request(ALL, reason, retry, origin), print)
            state.save(paths)
    except RunStateError as exc:
        print(f"error: {exc}\nexactly: {fathompipe(*retry, '--rebuild-state')}", file=sys.stderr)
        return 1
    except (SubmitError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if cfg.cluster != "slurm":
        return _local_outcome(cfg, paths)
    print(f"watch: {fathompipe('status', '--run-dir', str(paths.root))}")
    return 0


if __name__ == "__main__":
    sys.exit(quiet_pipe(main))
