"""Submitting stages: what submit, resume and resubmit share.

On Slurm every stage is queued at once, chained with `afterok` dependencies (and
`kill-on-invalid-dep`, so nothing waits forever on a failed job). Locally (submitit's local or
debug executor, which know no dependencies) stages run one after another and the driver waits.
"""
from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Set

import submitit

from .config import PipelineConfig
from .paths import RunPaths
from .runstate import RunState, Submission
from .slurm import ACTIVE, local_states, make_executor, query_states
from .stages import STAGES, Stage, Task, job_name

Printer = Callable[[str], None]


class SubmitError(RuntimeError):
    """Submission refused; the message says why and what to do instead."""


@contextmanager
def run_lock(paths: RunPaths) -> Iterator[None]:
    """One submit/resubmit/cancel at a time per run directory."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SubmitError(f"another fathompipe command is submitting into {paths.root}; wait for it") from None
        yield


def job_states(state: RunState, paths: RunPaths, job_ids: Optional[List[str]] = None) -> Dict[str, str]:
    """Scheduler state of each job id of the run (one batched query)."""
    ids = job_ids if job_ids is not None else state.all_job_ids()
    if state.cluster == "slurm":
        return query_states(ids)
    states: Dict[str, str] = {}
    for stage in state.stages:
        states.update(local_states(paths.logs(stage),
                                   [j for j in ids if j in state.stage(stage).latest_jobs().values()]))
    return states


def active_jobs(state: RunState, paths: RunPaths) -> Dict[str, str]:
    return {j: s for j, s in job_states(state, paths).items() if s in ACTIVE}


@dataclass(frozen=True)
class ActiveTask:
    """An unfinished task whose job is still queued or running."""

    stage: Stage
    key: str
    job: str
    state: str


def active_unfinished(cfg: PipelineConfig, paths: RunPaths, state: RunState,
                      stage_names: Optional[List[str]] = None) -> List[ActiveTask]:
    """Queued or running jobs of tasks without a completion marker: the ones a resume could
    duplicate (a finished task's job that is still exiting cannot)."""
    states = active_jobs(state, paths)
    busy: List[ActiveTask] = []
    for stage in STAGES:
        if stage_names is not None and stage.name not in stage_names:
            continue
        latest = state.stage(stage.name).latest_jobs()
        for task in stage.tasks(cfg, paths):
            job = latest.get(task.key)
            if job in states and not task.done():
                busy.append(ActiveTask(stage, task.key, job, states[job]))
    return busy


def _dependency(stage: Stage, cfg: PipelineConfig, paths: RunPaths, state: RunState,
                new: Dict[str, Submission], states: Dict[str, str]) -> Optional[str]:
    """`afterok:...` on the unfinished upstream work; None if that work can never finish."""
    deps: Set[str] = set()
    for up_name in stage.after:
        up = next(s for s in STAGES if s.name == up_name)
        latest = state.stage(up_name).latest_jobs()
        for task in up.tasks(cfg, paths):
            if task.done():
                continue
            if up_name in new and task.key in new[up_name].tasks:
                deps.add(new[up_name].job_id)
            elif states.get(latest.get(task.key, ""), "") in ACTIVE:
                deps.add(latest[task.key])
            else:
                return None
    return "afterok:" + ":".join(sorted(deps)) if deps else ""


def _wait_local(jobs: List[submitit.Job], stage: str, out: Printer) -> List[str]:
    """Wait for local jobs; the error line of each failed one."""
    errors: List[str] = []
    for job in jobs:
        while not job.done():
            time.sleep(0.5)
        exc = job.exception()
        if exc is not None:
            errors.append(f"{stage} job {job.job_id}: {str(exc).strip().splitlines()[-1][:300]}")
    return errors


def submit_stages(cfg: PipelineConfig, paths: RunPaths, state: RunState, stage_names: List[str], reason: str,
                  out: Printer, only: Optional[Dict[str, Set[str]]] = None) -> Dict[str, Submission]:
    """Submit the unfinished tasks of `stage_names` (graph order), record them, return them.

    `only` limits a stage to some task keys (resubmit --shards). Locally each stage is waited for,
    and a failed stage stops the chain.
    """
    new: Dict[str, Submission] = {}
    states = job_states(state, paths) if state.cluster == "slurm" else {}
    for stage in STAGES:
        if stage.name not in stage_names:
            continue
        tasks: List[Task] = [t for t in stage.tasks(cfg, paths) if not t.done()]
        if only and stage.name in only:
            tasks = [t for t in tasks if t.key in only[stage.name]]
        if not tasks:
            out(f"{stage.name}: nothing to do (every task has its completion marker)")
            continue
        dependency = _dependency(stage, cfg, paths, state, new, states) if state.cluster == "slurm" else ""
        if dependency is None:
            out(f"{stage.name}: not submitted: upstream work failed and was not resubmitted")
            continue
        resources = stage.resources(cfg)
        executor = make_executor(state.cluster, paths.logs(stage.name), resources, job_name(paths.root, stage.name),
                                 dependency)
        if state.cluster == "local":
            jobs = _submit_local_waves(executor, tasks, resources.array_parallelism, stage.name, out)
        else:
            with executor.batch():
                jobs = [executor.submit(task) for task in tasks]
        sub = Submission(job_id=jobs[0].job_id.split("_")[0] if state.cluster == "slurm" else jobs[0].job_id,
                         tasks={t.key: j.job_id for t, j in zip(tasks, jobs)}, dependency=dependency, reason=reason)
        state.stage(stage.name).submissions.append(sub)
        new[stage.name] = sub
        state.save(paths)
        dep = f" after {dependency}" if dependency else ""
        out(f"{stage.name}: submitted {len(tasks)} task(s) as job {sub.job_id}{dep}; logs in {paths.logs(stage.name)}")
        if state.cluster != "slurm":
            errors = _wait_local(jobs, stage.name, out)
            if errors:
                for e in errors:
                    out(f"  FAILED {e}")
                out(f"{stage.name}: {len(errors)} task(s) failed; later stages not run. "
                    f"Retry with: python -m fathompipe.resubmit --run-dir {paths.root}")
                break
            out(f"{stage.name}: done")
    return new


def _submit_local_waves(executor: submitit.Executor, tasks: List[Task], parallelism: int, stage: str,
                        out: Printer) -> List[submitit.Job]:
    """The local executor starts every job at once; keep at most `parallelism` running."""
    jobs: List[submitit.Job] = []
    for task in tasks:
        while sum(not j.done() for j in jobs) >= parallelism:
            time.sleep(0.2)
        jobs.append(executor.submit(task))
    return jobs
