"""Submitting stages: what submit, resume and resubmit share.

On Slurm every stage is queued at once, chained with `afterok` dependencies (and
`kill-on-invalid-dep`, so nothing waits forever on a failed job). Work whose job is still queued or
running is never submitted again; what is submitted waits on it (an array task id when the rest of
its array was replaced). A stage sbatch refuses is recorded in run.json for `status`, with the key to
change and the command that completes the run. The decisions (`plan_submission`, `plan_dependency`,
`refused_change`, `refusal_fix`) are pure functions with fast tests; `submit_stages` strings them
together with thin effectful steps (cancel, sbatch, record, wait). Locally (submitit's local or debug
executor, which know no dependencies) stages run one after another and the driver waits.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import submitit
from omegaconf import OmegaConf

from fathompipe import atomic
from fathompipe.config import Origins, PipelineConfig, load_config, to_dict
from fathompipe.layout import RunPaths
from fathompipe.pipeline.commands import fathompipe
from fathompipe.pipeline.state import RunState, Submission
from fathompipe.pipeline.scheduler import (ACTIVE, SbatchRefused, afterok, cancel, job_sort_key, keys_to_change,
                                           local_states, make_executor, query_states, submit_array)
from fathompipe.pipeline.graph import STAGES, Stage, Task, job_comment, job_name

Printer = Callable[[str], None]


class SubmitError(RuntimeError):
    """Submission refused; the message says why and what to do instead."""


@contextmanager
def run_lock(paths: RunPaths) -> Iterator[None]:
    """One submit/resubmit/cancel at a time per run directory."""
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
        fh = open(paths.lock, "w")
    except OSError as exc:
        raise SubmitError(f"cannot write {paths.lock} ({exc.strerror}): choose a run_dir you can write to") from None
    with fh:
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
    old = to_dict(load_config(paths.config))  # through the loader: paths made absolute as they are now
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


def refusal_fix(stage: str, reason: str, origins: Origins) -> str:
    """What to change after sbatch refused `stage` for `reason`: its likely keys, grouped by where each was set,
    those set on the command line first (just typed: the likeliest), e.g. `change infer.resources.qos on the
    command line (infer.resources.qos=x)`."""
    places: Dict[str, List[str]] = {}
    names = [f"{stage}.resources.{key}" for key in keys_to_change(reason)]
    for name in sorted(names, key=lambda n: origins.override(n) is None):  # stable: the likeliest key first
        places.setdefault(origins.change(name), []).append(name)
    return "change " + " or ".join(f"{' or '.join(keys)} {where}" for where, keys in places.items())


def waits_for(never: List[str]) -> str:
    """Why a stage is not submitted when upstream work (`stage:key`) is neither finished, queued nor submitted."""
    ups = sorted({k.split(":")[0] for k in never})
    return (f"waits for {', '.join(ups)} work that is neither finished, queued nor submitted now "
            f"({', '.join(k.split(':', 1)[1] for k in never[:3])})")


@dataclass
class Request:
    """One submit, resume or resubmit: which stages (graph order), why, and what to say after a refusal."""

    stages: List[str]
    reason: str  # submit | resume | resubmit, recorded with each submission
    retry: List[str]  # the command (module, then arguments) that completes the run once a refused key is fixed
    origins: Origins  # where each key was set: where to change it
    only: Optional[Dict[str, Set[str]]] = None  # stage -> task keys (resubmit --shards)


def submit_stages(cfg: PipelineConfig, paths: RunPaths, state: RunState, request: Request,
                  out: Printer) -> Dict[str, Submission]:
    """Submit the unfinished tasks of the requested stages that are not queued or running, and record them.

    On Slurm, pending downstream jobs whose upstream gets new jobs are cancelled and re-chained. A stage sbatch
    refuses is recorded (status shows why, what to change and the retry command), the stages after it are not
    submitted, and SubmitError names the retry command. Locally each stage is waited for; a failure stops the chain.
    """
    states = job_states(state, paths) if state.cluster == "slurm" else {}
    unfinished = unfinished_tasks(cfg, paths, state, request.stages)
    plan, to_cancel = plan_submission([(s.name, s.after) for s in STAGES], unfinished, states, request.only)
    if to_cancel and state.cluster == "slurm":
        _rechain(state, to_cancel, out)
    live = {j for j, st in states.items() if st in ACTIVE and j not in to_cancel}
    new: Dict[str, Submission] = {}
    refused: List[str] = []
    for stage in (s for s in STAGES if s.name in request.stages):
        st = state.stage(stage.name)
        keys = plan.get(stage.name, [])
        left_alone = len(unfinished[stage.name]) - len(keys)
        if not keys:
            st.not_submitted = st.fix = ""
            out(f"{stage.name}: nothing to do" + (f" ({left_alone} task(s) still queued or running)" if left_alone
                                                 else " (every task has its completion marker)"))
            continue
        dependency = ""
        if state.cluster == "slurm":
            dep, never = plan_dependency(_upstream(cfg, paths, state, stage), _upstream_new(stage, new), live)
            if dep is None:
                _not_submitted(state, paths, stage.name, waits_for(never), "", out)
                continue
            dependency = dep
        tasks: List[Task] = [t for t in stage.tasks(cfg, paths) if t.key in set(keys)]
        try:
            jobs = _queue(cfg, paths, state.cluster, stage, tasks, dependency)
        except SbatchRefused as exc:
            if exc.submitted:  # the arrays sbatch accepted before it refused one: queued, so recorded
                _record(state, paths, stage.name, tasks[:len(exc.submitted)], exc.submitted, dependency,
                        request.reason)
            _refused(state, paths, stage.name, exc.reason, request, out)
            refused.append(stage.name)
            continue
        new[stage.name] = _record(state, paths, stage.name, tasks, jobs, dependency, request.reason)
        out(f"{stage.name}: submitted {len(tasks)} task(s) as job {new[stage.name].job_id}"
            + (f" after {dependency}" if dependency else "")
            + (f"; {left_alone} task(s) still queued or running were left alone" if left_alone else "")
            + f"; logs in {paths.logs(stage.name)}")
        if state.cluster != "slurm" and not _waited_local(jobs, stage.name, paths, out):
            break
    state.save(paths)
    if refused:
        raise SubmitError(f"Slurm refused the {', '.join(refused)} job(s); what was submitted stays queued. "
                          f"Make the change named above, then complete the run with: "
                          f"{fathompipe(*request.retry)}")
    return new


def _rechain(state: RunState, to_cancel: List[str], out: Printer) -> None:
    cancel(to_cancel)
    out(f"cancelled {len(to_cancel)} waiting downstream job(s) to re-chain them: {', '.join(to_cancel)}")
    state.log("rechain", cancelled=to_cancel)


def _upstream(cfg: PipelineConfig, paths: RunPaths, state: RunState, stage: Stage) -> Dict[str, Job]:
    """`upstream:key` -> latest job of each unfinished task of the stages `stage` runs after."""
    return {f"{up}:{k}": j for up in stage.after for k, j in unfinished_tasks(cfg, paths, state, [up])[up].items()}


def _upstream_new(stage: Stage, new: Dict[str, Submission]) -> Dict[str, str]:
    """`upstream:key` -> the job (the whole array, on Slurm) submitted for it just now."""
    return {f"{up}:{k}": job.split("_")[0] for up in stage.after if up in new for k, job in new[up].tasks.items()}


def _queue(cfg: PipelineConfig, paths: RunPaths, cluster: str, stage: Stage, tasks: List[Task],
           dependency: str) -> List[submitit.Job]:
    """Hand the tasks to submitit: one Slurm array (SbatchRefused when refused), or local processes."""
    resources = stage.resources(cfg)
    executor = make_executor(cluster, paths.logs(stage.name), resources, job_name(paths.root, stage.name),
                             dependency, job_comment(paths.root))
    if cluster == "local":
        return _submit_local_waves(executor, tasks, resources.array_parallelism)
    if cluster == "slurm":
        return submit_array(executor, list(tasks))
    with executor.batch():
        return [executor.submit(task) for task in tasks]


def _record(state: RunState, paths: RunPaths, stage: str, tasks: List[Task], jobs: List[submitit.Job],
            dependency: str, reason: str) -> Submission:
    """One Submission per Slurm array (a stage larger than Slurm's MaxArraySize goes in several); returns what was
    submitted now, all arrays together."""
    st = state.stage(stage)
    st.not_submitted = st.fix = ""
    arrays: Dict[str, Dict[str, str]] = {}
    for task, job in zip(tasks, jobs):
        array = job.job_id.split("_")[0] if state.cluster == "slurm" else jobs[0].job_id
        arrays.setdefault(array, {})[task.key] = job.job_id
    for array, keys in arrays.items():
        st.submissions.append(Submission(job_id=array, tasks=keys, dependency=dependency, reason=reason))
    state.save(paths)  # at once: a later refusal or crash must not lose the job ids
    return Submission(job_id=", ".join(arrays), tasks={k: j for keys in arrays.values() for k, j in keys.items()},
                      dependency=dependency, reason=reason)


def _not_submitted(state: RunState, paths: RunPaths, stage: str, why: str, fix: str, out: Printer) -> None:
    st = state.stage(stage)
    st.not_submitted, st.fix = why, fix
    state.save(paths)
    out(f"{stage}: not submitted: {why}" + (f" ({fix})" if fix else ""))


def _refused(state: RunState, paths: RunPaths, stage: str, reason: str, request: Request, out: Printer) -> None:
    """Record a refusal: why, the key to change, and the command that completes the run afterwards."""
    state.retry, state.retry_from = list(request.retry), os.getcwd()
    why = f"sbatch refused it: {reason}"
    state.log("refused", stage=stage, why=why)
    origins = request.origins  # status may be run elsewhere: the profile by its absolute path
    if origins.profile and os.path.isfile(origins.profile):
        origins = replace(origins, profile=os.path.abspath(origins.profile))
    _not_submitted(state, paths, stage, why, refusal_fix(stage, reason, origins), out)


def _waited_local(jobs: List[submitit.Job], stage: str, paths: RunPaths, out: Printer) -> bool:
    """Wait for a local stage's jobs; False (and each error line printed) when any failed."""
    errors: List[str] = []
    for job in jobs:
        while not job.done():
            time.sleep(0.5)
        exc = job.exception()
        if exc is not None:
            errors.append(f"{stage} job {job.job_id}: {str(exc).strip().splitlines()[-1][:300]}")
    if errors:
        for e in errors:
            out(f"  FAILED {e}")
        out(f"{stage}: {len(errors)} task(s) failed; later stages not run. "
            f"Retry with: {fathompipe('resubmit', '--run-dir', str(paths.root))}")
        return False
    out(f"{stage}: done")
    return True


def _submit_local_waves(executor: submitit.Executor, tasks: List[Task], parallelism: int) -> List[submitit.Job]:
    """The local executor starts every job at once; keep at most `parallelism` running."""
    jobs: List[submitit.Job] = []
    for task in tasks:
        while sum(not j.done() for j in jobs) >= parallelism:
            time.sleep(0.2)
        jobs.append(executor.submit(task))
    return jobs
