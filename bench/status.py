"""How fast `status` answers on a large run, and how many sacct calls it makes.

    python bench/status.py [--shards 100]

Submits a real download array of SHARDS tasks to the local Slurm (starting in an hour, so nothing runs), then
times `python -m fathompipe.status --json` with a sacct shim on PATH that counts its calls.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    run_dir = work / "status-bench"
    overrides = [f"run_dir={run_dir}", "cluster=slurm", f"download.num_shards={args.shards}",
                 f"data.test.annotations={ROOT / 'fathompipe/data/dataset_test.json'}",
                 f"data.test.images_dir={work / 'images'}", f"checkpoint.path={work / 'none.ckpt'}",
                 "download.resources.extra={begin: now+1hour}", "checkpoint.resources.extra={begin: now+1hour}",
                 "infer.resources.mem_gb=2"]
    proc = subprocess.run([sys.executable, "-m", "fathompipe.submit", *overrides], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        measure(run_dir, work, args.shards)
    finally:
        state = json.loads((run_dir / "run.json").read_text())
        subprocess.run(["scancel", *{s["job_id"] for st in state["stages"].values() for s in st["submissions"]}])


def measure(run_dir: Path, work: Path, shards: int) -> None:
    shim = work / "bin"
    shim.mkdir()
    real = shutil.which("sacct")
    (shim / "sacct").write_text(f"#!/bin/sh\necho call >> {work}/sacct.calls\nexec {real} \"$@\"\n")
    (shim / "sacct").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "fathompipe.status", "--run-dir", str(run_dir), "--json"],
                             cwd=ROOT, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
    calls = len((work / "sacct.calls").read_text().splitlines()) // 3
    stages = {s["stage"]: s for s in json.loads(out.stdout)["stages"]}
    print(f"\n## bench/status.py: a queued run of {shards} download shards\n")
    print("| measure | value |\n|---|---|")
    print(f"| status wall time (whole process, best of 3) | {min(times):.2f} s |")
    print(f"| sacct calls per status | {calls} |")
    print(f"| download tasks reported pending | {stages['download']['pending']} of {stages['download']['tasks']} |")


if __name__ == "__main__":
    main()
