"""Slurm through submitit: sbatch parameters, rendering, executors, and job-state queries.

`sbatch_params` is the one mapping from a stage's Resources to sbatch options; both the real
submission and `--dry-run` (`render_sbatch`, a pure function tested against a golden record) use it.
"""
from __future__ import annotations

import contextlib
import getpass
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import psutil
import submitit
from submitit.core.utils import FailedJobError
# private API (submitit 1.5.4): the exact sbatch text submitit submits, for --dry-run and sbatch --test-only
from submitit.slurm.slurm import _make_sbatch_string

from fathompipe.config import Resources

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


def sbatch_params(resources: Resources, job_name: str, dependency: str = "", comment: str = "") -> Dict[str, object]:
    """sbatch options (in submitit's `_make_sbatch_string` vocabulary) for one stage's jobs."""
    extra: Dict[str, object] = dict(resources.extra)
    if comment:
        extra["comment"] = comment  # the run directory: `squeue -O name,comment` tells runs apart
    if dependency:
        extra["kill-on-invalid-dep"] = "yes"  # a job whose dependency failed is cancelled, never left pending
    params: Dict[str, object] = {
        "job_name": job_name,
        "time": resources.timeout_min,
        "cpus_per_task": resources.cpus_per_task,
        "mem": f"{int(resources.mem_gb * 1024)}M",
        "array_parallelism": resources.array_parallelism,
        "signal_delay_s": resources.signal_delay_s,
        "additional_parameters": extra,
    }
    for key in ("partition", "account", "qos"):
        value = getattr(resources, key)
        if value:
            params[key] = value
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if dependency:
        params["dependency"] = dependency
    return params


def render_sbatch(resources: Resources, job_name: str, folder: str | Path, n_tasks: int, dependency: str = "",
                  python: str = sys.executable, comment: str = "") -> str:
    """The sbatch script submitit would submit for these tasks (pure: no files, no Slurm)."""
    # private module (submitit 1.5.4): the command line SlurmExecutor writes into every script it submits
    command = f"{python} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, map_count=n_tasks if n_tasks > 1 else None,
                               **sbatch_params(resources, job_name, dependency, comment))  # type: ignore[arg-type]


def sbatch_test_only(script: str) -> str:
    """'' when Slurm would accept this batch script now (`sbatch --test-only`: nothing is queued), else
    Slurm's own reason, e.g. `invalid partition specified: gpu-rtx6000`."""
    if not shutil.which("sbatch"):
        return "sbatch is not on PATH: submit from a Slurm login node, or use cluster=local"
    proc = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return ""
    return rejection_reason(proc.stderr) or f"sbatch --test-only exited {proc.returncode}"


def rejection_reason(stderr: str) -> str:
    """Slurm's reason from sbatch's stderr: `sbatch: error: X` lines, else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln]
    errors += [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("allocation failure:")]
    return "; ".join(dict.fromkeys(errors)) or (lines[-1] if lines else "")


# Slurm's rejection words -> the Resources keys that can cause them, first the likeliest.
_REJECTION_KEYS = [
    (re.compile(r"qos", re.I), ["qos"]),
    (re.compile(r"\baccount\b|association", re.I), ["account"]),
    (re.compile(r"partition", re.I), ["partition"]),
    (re.compile(r"gres|gpu|tres", re.I), ["gpus_per_node", "partition"]),
    (re.compile(r"time limit", re.I), ["timeout_min"]),
    (re.compile(r"memory|mem", re.I), ["mem_gb"]),
    (re.compile(r"node configuration|node count|cpu", re.I), ["mem_gb", "cpus_per_task", "gpus_per_node"]),
]


def keys_to_change(reason: str) -> List[str]:
    """The Resources keys a rejection points at (for the message naming the profile key)."""
    for pattern, keys in _REJECTION_KEYS:
        if pattern.search(reason):
            return keys
    return ["partition", "account", "qos", "mem_gb", "cpus_per_task", "gpus_per_node", "extra"]


def make_executor(cluster: str, folder: Path, resources: Resources, job_name: str,
                  dependency: str = "", comment: str = "") -> submitit.Executor:
    """A submitit executor for one stage: Slurm, local subprocesses, or in-process debug."""
    if cluster == "slurm":
        ex: submitit.Executor = submitit.SlurmExecutor(folder=folder, python=sys.executable)
        ex.update_parameters(**sbatch_params(resources, job_name, dependency, comment))
    elif cluster == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=resources.timeout_min, gpus_per_node=resources.gpus_per_node)
    elif cluster == "debug":
        ex = submitit.DebugExecutor(folder=folder)
    else:
        raise ValueError(f"unknown cluster {cluster!r}")
    return ex


class SbatchRefused(RuntimeError):
    """sbatch refused a stage's script; `reason` is Slurm's own words (`rejection_reason`). `submitted`: the jobs of
    the arrays sbatch had accepted before it (a stage in several arrays), which are queued and must be recorded."""

    def __init__(self, reason: str, submitted: Optional[List[submitit.Job]] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.submitted = submitted or []


def max_array_size() -> int:
    """Slurm's MaxArraySize (an array's task indices run 0..MaxArraySize-1): 1001 unless the cluster sets it."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(found.group(1)) if found else DEFAULT_MAX_ARRAY_SIZE


DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default


def submit_array(executor: submitit.Executor, tasks: List[object], max_size: Optional[int] = None
                 ) -> List[submitit.Job]:
    """Submit `tasks` as one array (one job for one task), or as several when there are more than the cluster's
    MaxArraySize (e.g. 2 splits x 1,000 download shards); SbatchRefused with Slurm's reason when refused.

    submitit prints sbatch's stderr (`sbatch: error: ...`) before it raises the same text: kept out of the
    terminal here, so that the user reads Slurm's reason once, in fathompipe's message naming the key to change.
    """
    size = max_size or max_array_size()
    jobs: List[submitit.Job] = []
    try:
        for start in range(0, len(tasks), size):
            with contextlib.redirect_stderr(io.StringIO()), executor.batch():
                chunk = [executor.submit(task) for task in tasks[start:start + size]]  # type: ignore[arg-type]
            jobs += chunk  # submitted when the batch closes: only then are they queued
    except (FailedJobError, OSError) as exc:
        raise SbatchRefused(rejection_reason(str(exc)) or str(exc), jobs) from None
    return jobs


def expand_job_id(job_id: str) -> List[str]:
    """`123_[0-2,5%4]` (a pending array in sacct/squeue) -> 123_0, 123_1, 123_2, 123_5."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out: List[str] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += [f"{base}_{i}" for i in range(int(lo), int(hi) + 1)]
        elif part:
            out.append(f"{base}_{part}")
    return out


def job_sort_key(job_id: str) -> tuple:
    """Numeric order of job ids: 99 before 100, 7_2 before 7_10."""
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[_.]", job_id))


def afterok(job_ids: Iterable[str]) -> str:
    """`afterok:` on these jobs or array tasks (sorted numerically); '' for none."""
    ids = sorted(set(job_ids), key=job_sort_key)
    return "afterok:" + ":".join(ids) if ids else ""


def _array_ids(job_ids: Iterable[str]) -> List[str]:
    return sorted({j.split("_")[0] for j in job_ids}, key=job_sort_key)


def parse_sacct(text: str, wanted: Iterable[str]) -> Dict[str, str]:
    """`sacct -n -P -X -o JobID,State` output -> state of each wanted job or array task.

    `CANCELLED by 0` becomes CANCELLED; a pending array's `123_[0-3%2]` line covers its tasks; an array
    cancelled before any task started is one line `123` that covers them all.
    """
    states: Dict[str, str] = {}
    for line in text.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        for one in expand_job_id(jid.strip()):
            states[one] = state.split()[0] if state.strip() else "UNKNOWN"
    for job in wanted:
        base = job.split("_")[0]
        if job not in states and base in states:
            states[job] = states[base]
    return states


def parse_squeue(text: str) -> Dict[str, str]:
    """`squeue -h -r -o %i|%T` output -> state of each queued or running job or array task."""
    states: Dict[str, str] = {}
    for line in text.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            for one in expand_job_id(jid.strip()):
                states[one] = state.strip()
    return states


def query_states(job_ids: Iterable[str]) -> Dict[str, str]:
    """Slurm state of each job or array task: one batched sacct call, overlaid with this user's squeue
    (sacct lags behind a fresh submission: a job squeue lists is queued or running, whatever sacct says).

    Tasks that are neither in sacct nor queued come back absent.
    """
    wanted = list(job_ids)
    ids = _array_ids(wanted)
    if not ids:
        return {}
    states: Dict[str, str] = {}
    if shutil.which("sacct"):
        proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            states = parse_sacct(proc.stdout, wanted)
    if shutil.which("squeue"):
        proc = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"],
                              capture_output=True, text=True, timeout=60)
        mine = set(ids)
        states.update({j: s for j, s in parse_squeue(proc.stdout).items() if j.split("_")[0] in mine})
    return states


def local_states(folder: Path, job_ids: Iterable[str]) -> Dict[str, str]:
    """States of submitit local jobs (job id = pid), from result pickles and live processes."""
    states: Dict[str, str] = {}
    for jid in job_ids:
        result = submitit.core.utils.JobPaths(folder, job_id=jid, task_id=0).result_pickle
        if result.exists():
            try:
                with open(result, "rb") as fh:
                    outcome = pickle.load(fh)[0]
                states[jid] = "COMPLETED" if outcome == "success" else "FAILED"
            except Exception:
                states[jid] = "FAILED"
        elif jid.isdigit() and _pid_alive(int(jid)):
            states[jid] = "RUNNING"
    return states


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def queued_jobs_under(cluster: str, folder: Path) -> List[str]:
    """Queued or running jobs whose submitit folder lies under `folder`: a run's jobs, found without
    its run.json (Slurm: this user's batch scripts; local: submitit processes)."""
    prefix = str(folder.resolve()) + os.sep
    if cluster == "slurm":
        proc = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%o"], capture_output=True,
                              text=True, timeout=60, check=True)
        return sorted(line.split("|", 1)[0] for line in proc.stdout.splitlines()
                      if "|" in line and line.split("|", 1)[1].startswith(prefix))
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        # private module (submitit 1.5.4): what a running submitit job's command line holds
        if "submitit.core._submit" in cmd and any(arg.startswith(prefix) for arg in cmd):
            found.append(str(proc.info["pid"]))
    return sorted(found)


def cancel(job_ids: Iterable[str]) -> None:
    ids = sorted(set(job_ids), key=job_sort_key)
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *ids], check=False, capture_output=True, timeout=60)


def log_paths(folder: Path, job_id: str) -> Dict[str, Path]:
    p = submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=0)
    return {"stdout": p.stdout, "stderr": p.stderr}


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Failed|Interrupt|Mismatch)\b.*?:")
_SCHEDULER_LINE = re.compile(r"(CANCELLED|DUE TO TIME LIMIT|PREEMPT|oom-kill|Killed|NODE FAIL)", re.I)


def last_error_line(path: Path, max_bytes: int = 65536) -> Optional[str]:
    """The most telling line at the end of a log: the scheduler's own verdict (time limit,
    cancellation, OOM) if present, else the last Python exception line, else the last line."""
    if not path.exists():
        return None
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - max_bytes))
        lines = [ln.strip() for ln in fh.read().decode(errors="replace").replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    for pattern in (_SCHEDULER_LINE, _EXCEPTION_LINE):
        for ln in reversed(lines):
            if pattern.search(ln):
                return _shortened(ln)
    return _shortened(lines[-1]) if lines else None


def _shortened(line: str, limit: int = 1200) -> str:
    """A long line keeps its start and its end: an error's reason usually comes last."""
    return line if len(line) <= limit else f"{line[:limit // 3]} [...] {line[-(limit * 2 // 3):]}"
