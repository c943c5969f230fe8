"""Where a run stands: `python -m fathompipe.status --run-dir R [--json] [--watch [SECONDS]]`.

One table: per stage, job ids, Slurm states, tasks done/failed/running/pending, items processed,
elapsed time; for each failure its log and last error line; and the command to run next.
Job states come from one batched sacct call (squeue when accounting is off).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from fathompipe.cli import quiet_pipe
from fathompipe.config import ConfigError, PipelineConfig
from fathompipe.pipeline.submission import job_states
from fathompipe.layout import RunPaths
from fathompipe.pipeline.state import RunState, RunStateError, load_run
from fathompipe.pipeline.scheduler import ACTIVE, job_sort_key, last_error_line, log_paths
from fathompipe.pipeline.graph import STAGES


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
    states: Dict[str, int]  # Slurm state -> number of tasks
    tasks: int
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    pending: int = 0
    not_submitted: int = 0
    not_submitted_reason: str = ""
    items: Dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    failures: List[Failure] = field(default_factory=list)


def collect(paths: RunPaths, cfg: PipelineConfig, state: RunState) -> List[StageStatus]:
    states = job_states(state, paths)
    rows: List[StageStatus] = []
    now = time.time()
    for stage in STAGES:
        st = state.stage(stage.name)
        latest = st.latest_jobs()
        tasks = stage.tasks(cfg, paths)
        row = StageStatus(stage.name, sorted({s.job_id for s in st.submissions}, key=job_sort_key), {}, len(tasks))
        slurm_counts: Counter[str] = Counter()
        items: Counter[str] = Counter()
        for task in tasks:
            items.update(task.progress())
            job = latest.get(task.key)
            slurm = states.get(job, "UNKNOWN") if job else "NOT SUBMITTED"
            slurm_counts[slurm] += 1
            if task.done():
                row.done += 1
            elif slurm == "RUNNING":
                row.running += 1
            elif slurm in ACTIVE:
                row.pending += 1
            elif slurm == "NOT SUBMITTED":
                row.not_submitted += 1
                row.not_submitted_reason = st.not_submitted or "never submitted (the submitting command stopped)"
            elif slurm == "UNKNOWN" and state.cluster == "slurm" and job and now - _submitted_at(st, job) < 60:
                row.pending += 1  # just submitted; accounting has not caught up yet
            else:
                if slurm == "CANCELLED":
                    row.cancelled += 1
                else:
                    row.failed += 1
                log = log_paths(paths.logs(stage.name), job)["stderr"] if job else None
                ran = log is not None and log.exists()
                causes = getattr(task, "causes", dict)()
                causes = dict(sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])))
                row.failures.append(Failure(task.key, job or "-", slurm, str(log) if ran else "",
                                            last_error_line(log) if ran else None, causes))
        if row.not_submitted and st.not_submitted:
            row.not_submitted_reason = st.not_submitted
        row.states = dict(slurm_counts)
        row.items = dict(items)
        if st.submissions:
            row.elapsed_s = now - st.submissions[0].submitted_at
        rows.append(row)
    return rows


def _submitted_at(st: object, job: str) -> float:
    for sub in reversed(st.submissions):  # type: ignore[attr-defined]
        if job in sub.tasks.values():
            return sub.submitted_at
    return 0.0


def next_step(rows: List[StageStatus], paths: RunPaths) -> str:
    what = [f"{r.failed} {r.stage} task(s) failed" for r in rows if r.failed]
    what += [f"{r.cancelled} {r.stage} task(s) cancelled" for r in rows if r.cancelled]
    what += [f"{r.stage} not submitted: {r.not_submitted_reason}" for r in rows if r.not_submitted]
    busy = sum(r.running + r.pending for r in rows)
    if what:
        later = " (now, or when the jobs still queued or running are done)" if busy else ""
        fix = " after fixing the profile (--profile P)" if any("sbatch refused" in r.not_submitted_reason
                                                                 for r in rows) else ""
        return f"{'; '.join(what)}. Next{later}{fix}: python -m fathompipe.resubmit --run-dir {paths.root}"
    if all(r.done == r.tasks for r in rows):
        return "all stages complete"
    return f"in progress; refresh with: python -m fathompipe.status --run-dir {paths.root} --watch"


def _fmt_elapsed(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def render(rows: List[StageStatus], paths: RunPaths) -> str:
    header = ["stage", "jobs", "slurm", "done", "failed", "cancelled", "running", "pending", "items", "elapsed"]
    table = [header]
    for r in rows:
        items = " ".join(f"{k}={v}" for k, v in sorted(r.items.items())) or "-"
        slurm = " ".join(f"{k}:{v}" for k, v in sorted(r.states.items()))
        table.append([r.stage, ",".join(r.job_ids) or "-", slurm, f"{r.done}/{r.tasks}", str(r.failed),
                      str(r.cancelled), str(r.running), str(r.pending), items, _fmt_elapsed(r.elapsed_s)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"run {paths.root}"] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    for r in rows:
        if r.not_submitted:
            lines.append(f"  {r.stage}: {r.not_submitted} task(s) not submitted: {r.not_submitted_reason}")
        for f in r.failures[:10]:
            where = f"; log {f.log}" if f.log else " (never ran: no log)"
            lines.append(f"  {r.stage} {f.task}: job {f.job_id} {f.state}{where}")
            if f.causes:
                lines.append("      causes: " + ", ".join(f"{c} x{n}" for c, n in list(f.causes.items())[:5]))
            if f.last_line:
                lines.append(f"      {f.last_line}")
        if len(r.failures) > 10:
            lines.append(f"  ... and {len(r.failures) - 10} more failed {r.stage} tasks (--json lists all)")
    lines.append(next_step(rows, paths))
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
            print(json.dumps({"run_dir": str(paths.root), "stages": [asdict(r) for r in rows],
                              "next": next_step(rows, paths)}, indent=2))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render(rows, paths), flush=True)
        if not args.watch or all(r.done == r.tasks or r.failed or r.cancelled or r.not_submitted
                                 for r in rows if r.tasks):
            break
        time.sleep(args.watch)
        state = RunState.load(paths) or state
    return 1 if any(r.failed or r.cancelled or r.not_submitted for r in rows) else 0


if __name__ == "__main__":
    sys.exit(quiet_pipe(main))
