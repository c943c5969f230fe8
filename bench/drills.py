"""Reliability figures: run every failure drill on the real Slurm and print one table.

    python bench/drills.py [pytest options, e.g. -k checkpoint]

The drills are the tests marked `drill` (tests/test_drills_slurm.py and the user-cancel drill):
each injects a fault, checks what `status` says, recovers with one command, and measures the work
redone (images fetched again, ROIs predicted again) and the data lost. Needs Slurm up
(tests/infra/slurm.sh up) and the venv from setup.sh.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # support/

from support.drills import drill_table, recovered_cleanly  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "drills.json"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "drill", "-p", "no:cacheprovider",
                               *sys.argv[1:]], cwd=ROOT, env={**os.environ, "FATHOMPIPE_DRILL_REPORT": str(report)})
        records = json.loads(report.read_text()) if report.exists() else []
    print("\n## bench/drills.py: failure drills on the real Slurm\n")
    print("\n".join(drill_table(records)))
    clean = [r for r in records if recovered_cleanly(r)]
    print(f"\n{len(records)} drills; {len(clean)} recovered with nothing redone and nothing lost; "
          f"pytest exit status {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
