"""Building blocks for pipeline tests: a profile over the parity fixture served by a fake FathomNet."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import PIL

from conftest import PARITY, ROOT

PILLOW13 = int(PIL.__version__.split(".")[0]) >= 13
EXPECTED_SUBMISSION = PARITY / ("expected_submission_pillow13.csv" if PILLOW13 else "expected_submission.csv")


def write_profile(tmp_path: Path, annotations: Path, checkpoint: Path, cluster: str, **extra: str) -> Path:
    profile = {
        "run_dir": str(tmp_path / "run"),
        "cluster": cluster,
        "data": {"splits": ["test"], "test": {"annotations": str(annotations), "images_dir": str(tmp_path / "images")}},
        "download": {"num_shards": 3, "max_attempts": 2, "backoff_base_s": 0.05, "concurrency": 4,
                     "resources": {"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10, "array_parallelism": 3}},
        "checkpoint": {"path": str(checkpoint), "resources": {"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 10}},
        "infer": {"device": "cpu", "batch_size": 4, "num_workers": 0,
                  "encoder_config": str(PARITY / "tiny_dinov2_config.json"),
                  "resources": {"partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 1, "mem_gb": 2,
                                "timeout_min": 10}},
    }
    path = tmp_path / "profile.yaml"
    path.write_text(json.dumps(profile))  # JSON is YAML
    return path


def cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"fathompipe.{module}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def status_json(run_dir: Path) -> Dict:
    proc = cli("status", "--run-dir", str(run_dir), "--json", timeout=60)
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def wait_status(run_dir: Path, until: Callable[[Dict[str, Dict]], bool], timeout: float = 300) -> Dict[str, Dict]:
    deadline = time.monotonic() + timeout
    while True:
        st = status_json(run_dir)
        stages = {s["stage"]: s for s in st["stages"]}
        if until(stages):
            return stages
        if time.monotonic() > deadline:
            raise AssertionError(f"status never reached the expected state: {json.dumps(st, indent=1)[:3000]}")
        time.sleep(1.0)


def settled(stages: Dict[str, Dict]) -> bool:
    """Nothing running or pending any more."""
    return all(s["running"] == 0 and s["pending"] == 0 for s in stages.values())


def all_done(stages: Dict[str, Dict]) -> bool:
    """Every task of every stage has its completion marker."""
    return all(s["done"] == s["tasks"] for s in stages.values())


def squeue_jobs(name_prefix: str) -> List[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if name_prefix in ln]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 120, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def task_job(run_dir: Path, stage: str, task: str) -> str:
    """The Slurm job id (`1234_5` for an array task) that ran `task` of `stage` last."""
    state = json.loads((run_dir / "run.json").read_text())
    return [s["tasks"][task] for s in state["stages"][stage]["submissions"] if task in s["tasks"]][-1]


def mtimes(folder: Path, pattern: str) -> Dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern)}


def rewritten(before: Dict[str, int], folder: Path) -> List[str]:
    """Files of `before` that are gone or were written again since."""
    return [n for n, t in before.items() if not (folder / n).exists() or (folder / n).stat().st_mtime_ns != t]


def job_logs(run_dir: Path, stage: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs" / stage).glob("*_log.*")))
