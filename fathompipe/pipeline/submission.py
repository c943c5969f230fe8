"""Submitting stages: what submit, resume and resubmit share.

On Slurm every stage is queued at once, chained with `afterok` dependencies (and
`kill-on-invalid-dep`, so nothing waits forever on a failed job). Work whose job is still queued or
running is never submitted again; what is submitted waits on it (an array task id when the rest of
its array was replaced). A stage sbatch refuses is recorded in run.json for `status`. The decisions
(`plan_submission`, `plan_dependency`, `refused_change`) are pure functions with fast tests. Locally
(submitit's local or debug executor, which know no dependencies) stages run one after another and
the driver waits.
"""
from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import submitit
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError

from fathompipe import atomic
from fathompipe.config import PipelineConfig
from fathompipe.layout import RunPaths
from fathompipe.pipeline.state import RunState, Submission
from fathompipe.pipeline.scheduler import (ACTIVE, afterok, cancel, job_sort_key, keys_to_change, local_states,
                                           make_executor, query_states, rejection_reason)
from fathompipe.pipeline.graph import STAGES, Task, job_comment, job_name

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


def config_differences(old: object, new: object, prefix: str = "") -> List[Tuple[str, object, object]]:
    """Every leaf key whose value differs between two plain configuration trees: (key, old, new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in config_differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def refused_change(differences: List[Tuple[str, object, object]], started: Set[str]) -> Optional[str]:
    """Why a changed configuration cannot apply to an existing run, or None when it can: only the
    `resources` of stages without finished work may change (they change where and how jobs run, not results)."""
    for key, old, new in differences:
        parts = key.split(".")
        if len(parts) >= 3 and parts[1] == "resources" and parts[0] in {s.name for s in STAGES}:
            if parts[0] not in started:
                continue
            return f"{key}: {old!r} in the run, {new!r} now; {parts[0]} has finished work"
        return f"{key}: {old!r} in the run, {new!r} now"
    return None


def adopt_config(cfg: PipelineConfig, paths: RunPaths, state: RunState, config_yaml: str, out: Printer) -> None:
    """Accept the configuration for an existing run if it equals the stored one or changes only the
    resources of stages without finished work (then stored and logged); SubmitError otherwise."""
    old = OmegaConf.to_container(OmegaConf.load(paths.config))
    new = OmegaConf.to_container(OmegaConf.create(config_yaml))
    differences = config_differences(old, new)
    if not differences:
        return
    started = {s.name for s in STAGES if any(t.done() for t in s.tasks(cfg, paths))}
    why = refused_change(differences, started)
    if why:
        raise SubmitError(f"{paths.root} was submitted with another configuration ({why}). "
                          f"Use a new --run-dir, or the run's profile and overrides to resume.")
    atomic.write_text(paths.config, config_yaml)
    changed = [k for k, _, _ in differences]
    state.log("resources-changed", keys=changed)
    out(f"resources changed for work not yet done: {', '.join(changed)}")


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


Job = Optional[str]


def plan_dependency(upstream: Dict[str, Job], new_jobs: Dict[str, str],
                    live: Set[str]) -> Tuple[Optional[str], List[str]]:
    """The `afterok` string for a stage, from its unfinished upstream tasks (key -> latest job).

    A task resubmitted now waits on its new job; one still queued or running on that job (an array task
    id such as `123_2` when the rest of its array was replaced); any other can never finish: returned
    as the second value, and the string is then None.
    """
    deps: Set[str] = set()
    never: List[str] = []
    for key, job in upstream.items():
        if key in new_jobs:
            deps.add(new_jobs[key])
        elif job in live:
            deps.add(job)  # type: ignore[arg-type]
        else:
            never.append(key)
    return (None, never) if never else (afterok(deps), [])


def plan_submission(stages: List[Tuple[str, Tuple[str, ...]]], unfinished: Dict[str, Dict[str, Job]],
                    states: Dict[str, str], only: Optional[Dict[str, Set[str]]] = None
                    ) -> Tuple[Dict[str, List[str]], List[str]]:
    """What to submit and what to cancel, stage by stage in graph order (pure, for fast tests).

    `unfinished`: stage -> task key -> latest job (None: never submitted). A task whose job is queued or
    running is left alone; a pending downstream job whose upstream gets new work is cancelled and submitted
    again (re-chained); a running one is never touched. Returns (stage -> task keys, jobs to cancel).
    """
    submit: Dict[str, List[str]] = {}
    cancel: List[str] = []
    for name, after in stages:
        if name not in unfinished:
            continue
        rechain = any(up in submit for up in after)
        keys: List[str] = []
        for key, job in unfinished[name].items():
            if only is not None and name in only and key not in only[name]:
                continue
            state = states.get(job or "", "")
            if state not in ACTIVE:
                keys.append(key)
            elif rechain and state != "RUNNING" and state != "COMPLETING":
                keys.append(key)
                cancel.append(job)  # type: ignore[arg-type]
        if keys:
            submit[name] = keys
    return submit, sorted(set(cancel), key=job_sort_key)


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


def unfinished_tasks(cfg: PipelineConfig, paths: RunPaths, state: RunState,
                     stage_names: List[str]) -> Dict[str, Dict[str, Job]]:
    """Stage -> unfinished task key -> its latest job (None if never submitted)."""
    out: Dict[str, Dict[str, Job]] = {}
    for stage in STAGES:
        if stage.name in stage_names:
            latest = state.stage(stage.name).latest_jobs()
            out[stage.name] = {t.key: latest.get(t.key) for t in stage.tasks(cfg, paths) if not t.done()}
    return out


def submission_counts(cfg: PipelineConfig, paths: RunPaths, state: RunState, stage_names: List[str],
                      only: Optional[Dict[str, Set[str]]] = None) -> Dict[str, int]:
    """Stage -> how many tasks `submit_stages` would submit now (for the pre-flight of their scripts)."""
    states = job_states(state, paths) if state.cluster == "slurm" else {}
    plan, _ = plan_submission([(s.name, s.after) for s in STAGES], unfinished_tasks(cfg, paths, state, stage_names),
                              states, only)
    return {name: len(keys) for name, keys in plan.items()}


def submit_stages(cfg: PipelineConfig, paths: RunPaths, state: RunState, stage_names: List[str], reason: str,
                  out: Printer, only: Optional[Dict[str, Set[str]]] = None, retry: str = "") -> Dict[str, Submission]:
    """Submit the unfinished tasks of `stage_names` (graph order) that are not queued or running, record them.

    `only` limits a stage to some task keys (resubmit --shards). On Slurm, pending downstream jobs whose
    upstream gets new jobs are cancelled and re-chained. A stage sbatch refuses is recorded (status shows
    why), the stages after it are not submitted, and SubmitError names `retry`, the command that completes
    the run after the fix. Locally each stage is waited for, and a failed stage stops the chain.
    """
    new: Dict[str, Submission] = {}
    states = job_states(state, paths) if state.cluster == "slurm" else {}
    unfinished = unfinished_tasks(cfg, paths, state, stage_names)
    plan, to_cancel = plan_submission([(s.name, s.after) for s in STAGES], unfinished, states, only)
    if to_cancel and state.cluster == "slurm":
        cancel(to_cancel)
        out(f"cancelled {len(to_cancel)} waiting downstream job(s) to re-chain them: {', '.join(to_cancel)}")
        state.log("rechain", cancelled=to_cancel)
    live = {j for j, st in states.items() if st in ACTIVE and j not in to_cancel}
    refused: List[str] = []
    for stage in STAGES:
        if stage.name not in stage_names:
            continue
        st = state.stage(stage.name)
        left_alone = len(unfinished[stage.name]) - len(plan.get(stage.name, []))
        if stage.name not in plan:
            st.not_submitted = ""
            out(f"{stage.name}: nothing to do" + (f" ({left_alone} task(s) still queued or running)" if left_alone
                                                 else " (every task has its completion marker)"))
            continue
        keys = set(plan[stage.name])
        tasks: List[Task] = [t for t in stage.tasks(cfg, paths) if t.key in keys]
        dependency = ""
        if state.cluster == "slurm":
            upstream = {f"{up}:{k}": j for up in stage.after for k, j in
                        unfinished_tasks(cfg, paths, state, [up])[up].items()}
            new_jobs = {f"{up}:{k}": new[up].job_id for up in stage.after if up in new for k in new[up].tasks}
            dep, never = plan_dependency(upstream, new_jobs, live)
            if dep is None:
                ups = sorted({k.split(":")[0] for k in never})
                st.not_submitted = (f"waits for {', '.join(ups)} work that is neither finished, queued nor "
                                    f"submitted now ({', '.join(k.split(':', 1)[1] for k in never[:3])})")
                state.save(paths)
                out(f"{stage.name}: not submitted: {st.not_submitted}")
                continue
            dependency = dep
        resources = stage.resources(cfg)
        executor = make_executor(state.cluster, paths.logs(stage.name), resources, job_name(paths.root, stage.name),
                                 dependency, job_comment(paths.root))
        try:
            if state.cluster == "local":
                jobs = _submit_local_waves(executor, tasks, resources.array_parallelism, stage.name, out)
            else:
                with executor.batch():
                    jobs = [executor.submit(task) for task in tasks]
        except (FailedJobError, OSError) as exc:
            st.not_submitted = f"sbatch refused it: {rejection_reason(str(exc)) or exc}"
            state.log("refused", stage=stage.name, why=st.not_submitted)
            state.save(paths)
            keys_hint = ", ".join(f"{stage.name}.resources.{k}" for k in keys_to_change(st.not_submitted))
            out(f"{stage.name}: not submitted: {st.not_submitted} (check {keys_hint})")
            refused.append(stage.name)
            continue
        st.not_submitted = ""
        sub = Submission(job_id=jobs[0].job_id.split("_")[0] if state.cluster == "slurm" else jobs[0].job_id,
                         tasks={t.key: j.job_id for t, j in zip(tasks, jobs)}, dependency=dependency, reason=reason)
        st.submissions.append(sub)
        new[stage.name] = sub
        state.save(paths)
        dep = f" after {dependency}" if dependency else ""
        extra = f"; {left_alone} task(s) still queued or running were left alone" if left_alone else ""
        out(f"{stage.name}: submitted {len(tasks)} task(s) as job {sub.job_id}{dep}{extra}; "
            f"logs in {paths.logs(stage.name)}")
        if state.cluster != "slurm":
            errors = _wait_local(jobs, stage.name, out)
            if errors:
                for e in errors:
                    out(f"  FAILED {e}")
                out(f"{stage.name}: {len(errors)} task(s) failed; later stages not run. "
                    f"Retry with: python -m fathompipe.resubmit --run-dir {paths.root}")
                break
            out(f"{stage.name}: done")
    state.save(paths)
    if refused:
        raise SubmitError(f"Slurm refused the {', '.join(refused)} job(s); what was submitted stays queued. "
                          f"Fix the profile key named above, then complete the run with: "
                          f"{retry or f'python -m fathompipe.resubmit --run-dir {paths.root}'}")
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
