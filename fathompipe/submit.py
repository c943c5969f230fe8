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
import shlex
import subprocess
import sys
from typing import List


from fathompipe import atomic
from fathompipe.cli import quiet_pipe
from fathompipe.config import ConfigError, PipelineConfig, load_config, to_yaml
from fathompipe.pipeline.submission import SubmitError, adopt_config, run_lock, submission_counts, submit_stages
from fathompipe.layout import RunPaths
from fathompipe.pipeline.preflight import check_scripts, preflight
from fathompipe.pipeline.state import RunState, RunStateError
from fathompipe.pipeline.scheduler import queued_jobs_under, render_sbatch
from fathompipe.pipeline.graph import STAGES, job_comment, job_name


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


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="job profile YAML, e.g. jobs/pace.yaml (default: built-in defaults)")
    parser.add_argument("--run-dir", help="run directory (overrides run_dir)")
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], help="overrides cluster")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
    parser.add_argument("--rebuild-state", action="store_true",
                        help="run.json lost or damaged: rebuild it from the completion markers on disk and resume")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.cluster:
        overrides.append(f"cluster={args.cluster}")
    try:
        cfg = load_config(args.profile, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = RunPaths.of(cfg.run_dir)
    source = args.profile or "the defaults"
    if args.dry_run:
        for stage in STAGES:
            n = len(stage.tasks(cfg, paths))
            dep = "afterok:<" + ",".join(stage.after) + " job ids>" if stage.after else ""
            print(f"# ---- stage {stage.name}: {n} task(s) ----")
            print(render_sbatch(stage.resources(cfg), job_name(paths.root, stage.name), paths.logs(stage.name), n, dep,
                                comment=job_comment(paths.root)))
    existing = paths.run_json.exists() and not args.dry_run
    # a resume's scripts are checked below; the annotation tables are cut here, unless this is a dry run
    errors = preflight(cfg, paths, source, {} if existing else None, write_tables=not args.dry_run)
    if errors:
        print("error: nothing was submitted:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    if args.dry_run:
        print("# pre-flight passed: annotations valid, directories writable"
              + (", every script accepted by sbatch --test-only" if cfg.cluster == "slurm" else ""))
        return 0
    config_yaml = to_yaml(cfg)
    again = shlex.join(["python", "-m", "fathompipe.submit",
                        *[a for a in (sys.argv[1:] if argv is None else argv) if a != "--rebuild-state"]])
    try:
        with run_lock(paths):
            try:
                state = RunState.load(paths)
            except RunStateError:
                if not args.rebuild_state:
                    raise
                state = _rebuilt_state(cfg, paths, config_yaml)
            if state is None:
                state = RunState(cluster=cfg.cluster)
                atomic.write_text(paths.config, config_yaml)
                state.save(paths)  # before the first sbatch: a refused one leaves a reusable run directory
                reason = "submit"
                print(f"new run in {paths.root} (cluster: {cfg.cluster})")
            else:
                adopt_config(cfg, paths, state, config_yaml, print)
                counts = submission_counts(cfg, paths, state, [s.name for s in STAGES])
                errors = check_scripts(cfg, paths, source, counts) if cfg.cluster == "slurm" else []
                if errors:
                    raise SubmitError("nothing was submitted:\n  " + "\n  ".join(errors))
                reason = "resume"
                print(f"resuming {paths.root}: only unfinished tasks that are not queued or running are submitted")
            state.log(reason)
            submit_stages(cfg, paths, state, [s.name for s in STAGES], reason, print, retry=again)
            state.save(paths)
    except RunStateError as exc:
        print(f"error: {exc}\nexactly: {again} --rebuild-state", file=sys.stderr)
        return 1
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if cfg.cluster != "slurm":  # local runs are finished here: say whether everything is done
        unfinished = [f"{s.name} {t.key}" for s in STAGES for t in s.tasks(cfg, paths) if not t.done()]
        if unfinished:
            print(f"error: unfinished: {', '.join(unfinished[:5])}; "
                  f"see python -m fathompipe.status --run-dir {paths.root}", file=sys.stderr)
            return 1
        return 0
    print(f"watch: python -m fathompipe.status --run-dir {paths.root}")
    return 0


if __name__ == "__main__":
    sys.exit(quiet_pipe(main))
