"""`run.json`: what was submitted for a run, so status, resubmit and cancel need no guessing; `load_run` reads a
run back with its configuration."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from fathompipe import atomic
from fathompipe.config import PipelineConfig, load_config
from fathompipe.layout import RunPaths

VERSION = 1


class RunStateError(RuntimeError):
    """run.json is missing or unreadable; the message says how to recover."""


def rebuild_hint(paths: RunPaths) -> str:
    return (f"To rebuild it from the completion markers on disk and resume, keeping all finished work: "
            f"python -m fathompipe.submit --profile <the run's profile> --run-dir {paths.root} --rebuild-state "
            f"(with the run's overrides; it refuses while any job of the run is still queued or running).")


@dataclass
class Submission:
    job_id: str  # the array (or single) job id
    tasks: Dict[str, str]  # task key -> Slurm job id of that task, e.g. "test/3" -> "1234_3"
    dependency: str = ""
    reason: str = "submit"  # submit | resume | resubmit
    submitted_at: float = field(default_factory=time.time)


@dataclass
class StageState:
    submissions: List[Submission] = field(default_factory=list)
    not_submitted: str = ""  # why the stage's last submission did not happen (sbatch refused, upstream missing)
    fix: str = ""  # after sbatch refused it: which key to change and where, e.g. "change infer.resources.qos in P"

    def latest_jobs(self) -> Dict[str, str]:
        """Task key -> the job id of its most recent submission."""
        latest: Dict[str, str] = {}
        for sub in self.submissions:
            latest.update(sub.tasks)
        return latest


@dataclass
class RunState:
    cluster: str
    stages: Dict[str, StageState] = field(default_factory=dict)
    history: List[Dict[str, object]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    version: int = VERSION
    # after a refusal: the command that completes the run once the key is fixed (module, then its arguments, e.g.
    # ["submit", "--profile", "jobs/pace.yaml"]) and the directory it was typed in (its paths are relative to it)
    retry: List[str] = field(default_factory=list)
    retry_from: str = ""

    def stage(self, name: str) -> StageState:
        return self.stages.setdefault(name, StageState())

    def log(self, action: str, **details: object) -> None:
        self.history.append({"action": action, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **details})

    def all_job_ids(self) -> List[str]:
        return sorted({j for s in self.stages.values() for j in s.latest_jobs().values()})

    def save(self, paths: RunPaths) -> None:
        atomic.write_json(paths.run_json, asdict(self))

    @classmethod
    def load(cls, paths: RunPaths) -> Optional["RunState"]:
        """None for a run never submitted; RunStateError for one whose state is damaged."""
        if not paths.run_json.exists():
            if paths.config.exists():
                raise RunStateError(f"{paths.run_json} is missing but {paths.config} exists: this run was submitted "
                                    f"before and its job ids are lost. Nothing was submitted. {rebuild_hint(paths)}")
            return None
        try:
            raw = json.loads(paths.run_json.read_text())
            stages = {
                name: StageState([Submission(**s) for s in st["submissions"]], st.get("not_submitted", ""),
                                 st.get("fix", ""))
                for name, st in raw.pop("stages").items()
            }
            return cls(stages=stages, **raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RunStateError(f"{paths.run_json} is corrupt ({type(exc).__name__}: {exc}). "
                                f"Nothing was submitted. {rebuild_hint(paths)}") from None


def load_run(run_dir: str | Path) -> tuple[RunPaths, PipelineConfig, RunState]:
    """A submitted run's paths, configuration and state; RunStateError when nothing was submitted there."""
    paths = RunPaths.of(run_dir)
    state = RunState.load(paths)
    if state is None:
        raise RunStateError(f"{paths.root} has no run.json: nothing was submitted there "
                            f"(python -m fathompipe.submit --run-dir {paths.root} ...)")
    return paths, load_config(paths.config), state
