"""Cancel a run: `python -m fathompipe.cancel --run-dir R`.

scancels every job of the run still queued or running, and records it in run.json. Finished work
stays on disk; `python -m fathompipe.resubmit --run-dir R` picks up from there later.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List

from fathompipe.cli import quiet_pipe
from fathompipe.config import ConfigError
from fathompipe.pipeline.commands import fathompipe
from fathompipe.pipeline.submission import SubmitError, active_jobs, run_lock
from fathompipe.pipeline.state import RunStateError, load_run
from fathompipe.pipeline.scheduler import cancel
from fathompipe.pipeline.graph import STAGES


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.cancel", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    try:
        paths, cfg, state = load_run(args.run_dir)
        with run_lock(paths):
            if state.cluster == "slurm":
                # every unfinished task's latest job, without asking sacct (which lags behind new jobs);
                # scancel ignores jobs that already ended
                busy = sorted({state.stage(stage.name).latest_jobs()[task.key] for stage in STAGES
                               for task in stage.tasks(cfg, paths)
                               if not task.done() and task.key in state.stage(stage.name).latest_jobs()})
                cancel(busy)
            else:  # local jobs are processes of this machine
                busy = sorted(active_jobs(state, paths))
                for pid in busy:
                    os.kill(int(pid), signal.SIGTERM)
            state.log("cancel", jobs=busy)
            state.save(paths)
    except (SubmitError, RunStateError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cancelled {len(busy)} job(s){': ' + ', '.join(busy) if busy else ''}; finished work is kept. "
          f"Continue later with: {fathompipe('resubmit', '--run-dir', str(paths.root))}")
    return 0


if __name__ == "__main__":
    sys.exit(quiet_pipe(main))
