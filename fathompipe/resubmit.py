"""Resubmit only what failed: `python -m fathompipe.resubmit --run-dir R [--stage S] [--shards 3,7] [--profile P k=v]`.

Unfinished tasks (no completion marker) whose job is no longer queued or running are submitted again
as a new array, keeping their task keys, at once: tasks still running are left alone, and every waiting
downstream job is cancelled and re-chained onto the new jobs plus the old ones still running, so it
starts as soon as all its inputs are done. Finished tasks never run again. With `--profile` and/or
`key=value` overrides (applied over the run's own configuration when no profile is given) the run takes
changed `resources` for stages without finished work, e.g. a fixed partition.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Set

from fathompipe.cli import quiet_pipe
from fathompipe.config import ConfigError, PipelineConfig, load_config, origins, to_yaml
from fathompipe.layout import RunPaths
from fathompipe.pipeline.commands import fathompipe
from fathompipe.pipeline.graph import STAGES, Stage, downstream, stage_by_name
from fathompipe.pipeline.preflight import preflight
from fathompipe.pipeline.state import RunStateError, load_run
from fathompipe.pipeline.submission import (Request, SubmitError, adopt_config, run_lock, submission_counts,
                                            submit_stages)


def selected_shards(spec: str, first: List[Stage], cfg: PipelineConfig, paths: RunPaths) -> Dict[str, Set[str]]:
    """`--shards 3,7` (or task keys like test/3) -> stage -> task keys; SubmitError naming unknown ones."""
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    only: Dict[str, Set[str]] = {}
    matched: Set[str] = set()
    known: List[str] = []
    for s in first:
        keys = [t.key for t in s.tasks(cfg, paths)]
        known += keys
        only[s.name] = {k for k in keys if k in wanted or k.rsplit("/", 1)[-1] in wanted}
        matched |= {w for w in wanted for k in keys if w in (k, k.rsplit("/", 1)[-1])}
    unknown = sorted(wanted - matched)
    if unknown or not wanted:
        shown = ", ".join(sorted(dict.fromkeys(k.rsplit("/", 1)[-1] for k in known), key=lambda k: (len(k), k)))
        raise SubmitError(f"--shards {spec}: no such shard {', '.join(unknown) or '(empty)'}; "
                          f"the shards are {shown} (or task keys such as {known[0] if known else 'test/0'})")
    return only


def stages_from(first: List[Stage]) -> List[str]:
    """The stages to consider: the selected ones and everything that runs after them, in graph order."""
    names = [s.name for s in first]
    for s in first:
        names += [d.name for d in downstream(s.name) if d.name not in names]
    return names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.resubmit", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--stage", help="only this stage (and what runs after it)")
    parser.add_argument("--shards", help="comma-separated shard numbers (task keys like test/3 also accepted)")
    parser.add_argument("--profile", help="the run's profile, edited: take its changed resources")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="changed resources, over the profile if given, else over the run's configuration")
    args = parser.parse_args(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        paths, cfg, state = load_run(args.run_dir)
        changed = bool(args.profile or args.overrides)
        if changed:
            cfg = load_config(args.profile or paths.config,
                              [*args.overrides, f"run_dir={paths.root}", f"cluster={cfg.cluster}"])
        origin = origins(args.profile, args.overrides, base=str(paths.config))
        first = [stage_by_name(args.stage)] if args.stage else STAGES
        names = stages_from(first)
        only = selected_shards(args.shards, first, cfg, paths) if args.shards else None
        with run_lock(paths):
            if changed:
                adopt_config(cfg, paths, state, to_yaml(cfg), print)
            errors = preflight(cfg, paths, origin, submission_counts(cfg, paths, state, names, only))
            if errors:
                raise SubmitError("nothing was submitted:\n  " + "\n  ".join(errors))
            state.log("resubmit", stages=names, shards=args.shards or "all unfinished")
            new = submit_stages(cfg, paths, state, Request(names, "resubmit", ["resubmit", *words], origin, only),
                                print)
            state.save(paths)
            if not new:
                print("nothing resubmitted: every selected task is finished, queued or running")
    except (SubmitError, RunStateError, ConfigError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"watch: {fathompipe('status', '--run-dir', str(paths.root))}")
    return 0


if __name__ == "__main__":
    sys.exit(quiet_pipe(main))
