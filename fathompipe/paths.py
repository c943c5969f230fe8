"""Every path inside a run directory, in one class (the submitit JobPaths idea)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunPaths":
        return cls(Path(run_dir).expanduser().resolve())

    @property
    def config(self) -> Path:
        """The resolved configuration, secrets redacted."""
        return self.root / "config.yaml"

    @property
    def run_json(self) -> Path:
        """Stages, job ids, task keys and every (re)submission."""
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def logs(self, stage: str) -> Path:
        """submitit's folder for a stage: sbatch scripts, pickles and `%A_%a` logs."""
        return self.root / "logs" / stage

    def state(self, stage: str) -> Path:
        """Per-task records and completion markers of a stage."""
        return self.root / stage
