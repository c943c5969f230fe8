"""Where a run stands: `python -m fathompipe.status --run-dir R [--json] [--watch [SECONDS]]`.

One table: per stage, job ids, Slurm states, tasks done/failed/running/pending, items processed,
elapsed time; for each failure its log and last error line; and the command to run next.
Job states come from one batched sacct call (squeue when accounting is off).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from fathompipe.cli import quiet_pipe
from fathompipe.config import ConfigError, PipelineConfig
from fathompipe.layout import EVALUATE_DONE, RunPaths
from fathompipe.pipeline.commands import fathompipe, from_dir, python
from fathompipe.pipeline.graph import REPORT_PAGE, STAGES, Stage, Task
from fathompipe.pipeline.scheduler import ACTIVE, job_sort_key, last_error_line, log_paths
from fathompipe.pipeline.state import RunState, RunStateError, StageState, load_run
from fathompipe.pipeline.submission import job_states

ACCESS = ("HTTP 401", "HTTP 403", "HTTP 407")  # refusals a retry cannot fix: credentials, a proxy, a block


@dataclass
class Failure:
    task: str
    job_id: str
    state: str
    log: str  # '' when the job never ran (no log was written)
    last_line: Optional[str]
    causes: Dict[str, int] = field(default_factory=dict)  # download: error -> images, most common first


@dataclass
class StageStatus:
    stage: str
    job_ids: List[str]
    states: Dict[str, int]  # Slurm state -> number of UNFINISHED tasks (finished ones are in `done`)
    tasks: int
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    pending: int = 0
    not_submitted: int = 0
    not_submitted_reason: str = ""
    fix: str = ""  # after sbatch refused the stage: the key to change and where
    items: Dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0  # from the first submission to now, or to the last job's end once none is queued
    failures: List[Failure] = field(default_factory=list)


def collect(paths: RunPaths, cfg: PipelineConfig, state: RunState) -> List[StageStatus]:
    states = job_states(state, paths)
    now = time.time()
    return [_stage_status(stage, cfg, paths, state, states, now) for stage in STAGES]


def _stage_status(stage: Stage, cfg: PipelineConfig, paths: RunPaths, state: RunState, states: Dict[str, str],
                  now: float) -> StageStatus:
    st = state.stage(stage.name)
    latest = st.latest_jobs()
    tasks = stage.tasks(cfg, paths)
    row = StageStatus(stage.name, sorted({s.job_id for s in st.submissions}, key=job_sort_key), {}, len(tasks))
    slurm_counts: Counter[str] = Counter()
    items: Counter[str] = Counter()
    for task in tasks:
        items.update(task.progress())
        if task.done():
            row.done += 1
            continue
        job = latest.get(task.key)
        slurm = states.get(job, "UNKNOWN") if job else "NOT SUBMITTED"
        if slurm == "UNKNOWN" and state.cluster == "slurm" and job and now - _submitted_at(st, job) < 60:
            slurm = "SUBMITTED"  # just now; accounting has not caught up yet
        slurm_counts[slurm] += 1
        if slurm == "RUNNING":
            row.running += 1
        elif slurm in ACTIVE or slurm == "SUBMITTED":
            row.pending += 1
        elif slurm == "NOT SUBMITTED":
            row.not_submitted += 1
        else:
            row.failures.append(_failure(paths, stage.name, task, job or "-", slurm))
            row.cancelled += slurm == "CANCELLED"
            row.failed += slurm != "CANCELLED"
    if row.not_submitted:
        row.not_submitted_reason = st.not_submitted or "never submitted (the submitting command stopped)"
        row.fix = st.fix
    row.states, row.items = dict(slurm_counts), dict(items)
    row.elapsed_s = _elapsed(st, paths.logs(stage.name), busy=bool(row.running or row.pending), now=now)
    return row


def _failure(paths: RunPaths, stage: str, task: Task, job: str, slurm: str) -> Failure:
    log = log_paths(paths.logs(stage), job)["stderr"] if job != "-" else None
    ran = log is not None and log.exists()
    causes = getattr(task, "causes", dict)()
    causes = dict(sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])))
    return Failure(task.key, job, slurm, str(log) if ran else "", last_error_line(log) if ran and log else None,
                   causes)


def _elapsed(st: StageState, logs: Path, busy: bool, now: float) -> float:
    """Wall time of a stage: from its first submission to now while a task is queued or running, else to the
    last write of any of its jobs' logs (when the last job ended), so a finished stage's clock stops."""
    if not st.submissions:
        return 0.0
    start = st.submissions[0].submitted_at
    if busy:
        return max(0.0, now - start)
    ends = [p.stat().st_mtime for job in st.latest_jobs().values() for p in log_paths(logs, job).values()
            if p.exists()]
    return max(0.0, max(ends, default=start) - start)


def _submitted_at(st: StageState, job: str) -> float:
    for sub in reversed(st.submissions):
        if job in sub.tasks.values():
            return sub.submitted_at
    return 0.0


@dataclass
class NextStep:
    """What to do next, and the command for it ('' when none is to be run), as the user can paste it here."""

    text: str
    command: str = ""


def next_step(rows: List[StageStatus], paths: RunPaths, state: RunState) -> NextStep:
    """The step that can help now: after a refusal the fix and the refused command (a resubmit would reuse the
    refused configuration); after access refusals, access first; after failures, resubmit; at the end, the reports."""
    resubmit = fathompipe("resubmit", "--run-dir", str(paths.root))
    what = [f"{r.failed} {r.stage} task(s) failed" for r in rows if r.failed]
    what += [f"{r.cancelled} {r.stage} task(s) cancelled" for r in rows if r.cancelled]
    what += [f"{r.stage} not submitted: {r.not_submitted_reason}" for r in rows if r.not_submitted]
    fixes = [r.fix for r in rows if r.not_submitted and r.fix]
    if fixes and state.retry:  # the fixed configuration has to come in: through the command that was refused
        again = from_dir(fathompipe(*state.retry), state.retry_from)
        return NextStep(f"{'; '.join(what)}. Next: {'; '.join(fixes)}, then run: {again}", again)
    if what:
        later = " (now, or when the jobs still queued or running are done)" \
            if any(r.running or r.pending for r in rows) else ""
        refused = Counter({c: n for r in rows for f in r.failures for c, n in f.causes.items() if c in ACCESS})
        if refused:
            answers = ", ".join(f"{c} x{n}" for c, n in refused.most_common())
            return NextStep(f"{'; '.join(what)}. The image server refused access ({answers}), retried "
                            f"download.max_attempts times each: resubmitting alone gets the same answers. Next: fix "
                            f"access first (a proxy, a firewall, expired credentials: fetch one image URL of the "
                            f"annotation file with curl on a compute node), then{later}: {resubmit}", resubmit)
        return NextStep(f"{'; '.join(what)}. Next{later}: {resubmit}", resubmit)
    if all(r.done == r.tasks for r in rows):
        return _finished(paths)
    watch = fathompipe("status", "--run-dir", str(paths.root), "--watch")
    return NextStep(f"in progress; refresh with: {watch}", watch)


def _finished(paths: RunPaths) -> NextStep:
    """Every stage is complete: where the reports are and the command that opens the FiftyOne App."""
    reports, app = [], ""
    for marker in sorted(paths.state("evaluate").glob(f"*/{EVALUATE_DONE}")):
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            continue
        reports.append(str(done.get("report", marker.parent / REPORT_PAGE)))
        fo = done.get("fiftyone") or {}
        if fo.get("dataset") and not app:
            from fathompipe.evaluation.fiftyone_io import app_command
            app = fo.get("app_command") or app_command(fo["dataset"], fo.get("saved_view"))  # as the stage printed it
            app = shlex.quote(python()) + app.removeprefix("python") if app.startswith("python ") else app
    text = "all stages complete" + (f". Reports: {', '.join(reports)}" if reports else "")
    return NextStep(text + (f". FiftyOne App: {app}" if app else ""), app)


def _fmt_elapsed(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def render(rows: List[StageStatus], paths: RunPaths, state: RunState) -> str:
    header = ["stage", "jobs", "slurm", "done", "failed", "cancelled", "running", "pending", "items", "elapsed"]
    table = [header]
    for r in rows:
        items = " ".join(f"{k}={v}" for k, v in sorted(r.items.items())) or "-"
        slurm = " ".join(f"{k}:{v}" for k, v in sorted(r.states.items())) or "-"
        table.append([r.stage, ",".join(r.job_ids) or "-", slurm, f"{r.done}/{r.tasks}", str(r.failed),
                      str(r.cancelled), str(r.running), str(r.pending), items, _fmt_elapsed(r.elapsed_s)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"run {paths.root}"] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    for r in rows:
        if r.not_submitted:
            lines.append(f"  {r.stage}: {r.not_submitted} task(s) not submitted: {r.not_submitted_reason}"
                         + (f" ({r.fix})" if r.fix else ""))
        for f in r.failures[:10]:
            where = f"; log {f.log}" if f.log else " (never ran: no log)"
            lines.append(f"  {r.stage} {f.task}: job {f.job_id} {f.state}{where}")
            if f.causes:
                lines.append("      causes: " + ", ".join(f"{c} x{n}" for c, n in list(f.causes.items())[:5]))
            if f.last_line:
                lines.append(f"      {f.last_line}")
        if len(r.failures) > 10:
            lines.append(f"  ... and {len(r.failures) - 10} more failed {r.stage} tasks (--json lists all)")
    lines.append(next_step(rows, paths, state).text)
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.status", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--watch", nargs="?", const=10.0, type=float, metavar="SECONDS")
    args = parser.parse_args(argv)
    try:
        paths, cfg, state = load_run(args.run_dir)
    except (RunStateError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    while True:
        rows = collect(paths, cfg, state)
        if args.json:
            step = next_step(rows, paths, state)
            print(json.dumps({"run_dir": str(paths.root), "stages": [asdict(r) for r in rows],
                              "next": step.text, "command": step.command}, indent=2))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render(rows, paths, state), flush=True)
        if not args.watch or all(r.done == r.tasks or r.failed or r.cancelled or r.not_submitted
                                 for r in rows if r.tasks):
            break
        time.sleep(args.watch)
        state = RunState.load(paths) or state
    return 1 if any(r.failed or r.cancelled or r.not_submitted for r in rows) else 0


if __name__ == "__main__":
    sys.exit(quiet_pipe(main))
