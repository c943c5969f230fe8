"""Resubmit only what failed: `python -m fathompipe.resubmit --run-dir R [--stage S] [--shards 3,7]`.

Unfinished tasks (no completion marker) whose job is no longer queued or running are submitted
again as a new array, keeping their task keys; every downstream stage that is not finished is
cancelled if still waiting and re-chained onto the new jobs. Finished tasks never run again.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Set

from .config import ConfigError
from .driver import SubmitError, active_unfinished, run_lock, submit_stages
from .runstate import RunStateError
from .slurm import cancel
from .stages import STAGES, downstream, stage_by_name
from .status import load_run


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.resubmit", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--stage", help="only this stage (and what runs after it)")
    parser.add_argument("--shards", help="comma-separated shard numbers (task keys like test/3 also accepted)")
    args = parser.parse_args(argv)
    try:
        paths, cfg, state = load_run(args.run_dir)
        with run_lock(paths):
            first = [stage_by_name(args.stage)] if args.stage else STAGES
            names = [s.name for s in first]
            for s in first:
                names += [d.name for d in downstream(s.name) if d.name not in names]
            only: Dict[str, Set[str]] = {}
            if args.shards:
                wanted = {w.strip() for w in args.shards.split(",") if w.strip()}
                for s in first:
                    only[s.name] = {t.key for t in s.tasks(cfg, paths)
                                    if t.key in wanted or t.key.rsplit("/", 1)[-1] in wanted}
            busy: List[str] = []
            to_cancel: List[str] = []
            for active in active_unfinished(cfg, paths, state, names):
                if any(n in names for n in active.stage.after):
                    to_cancel.append(active.job)  # waiting on jobs that are being replaced
                else:
                    busy.append(f"{active.stage.name} {active.key} ({active.job} {active.state})")
            if busy:
                raise SubmitError("still queued or running, not resubmitted: " + "; ".join(busy[:5]) +
                                  ". Wait for them, or `scancel` them first.")
            if to_cancel:
                cancel(to_cancel)
                print(f"cancelled {len(to_cancel)} waiting downstream job(s): {', '.join(sorted(to_cancel))}")
            state.log("resubmit", stages=names, shards=args.shards or "all unfinished", cancelled=to_cancel)
            new = submit_stages(cfg, paths, state, names, "resubmit", print, only or None)
            state.save(paths)
            if not new:
                print("nothing to resubmit: every selected task is finished")
    except (SubmitError, RunStateError, ConfigError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"watch: python -m fathompipe.status --run-dir {paths.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
