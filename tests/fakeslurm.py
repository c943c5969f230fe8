"""A recorded Slurm for fast driver tests: `sbatch`, `sacct`, `squeue`, `scancel` and `srun` as small programs
on PATH, answering in the formats slurm-wlm 22.05 printed on the test cluster (tests/test_driver_logic.py holds
the recordings), from one JSON file of jobs the test drives.

It stands in for Slurm the way submitit's own tests do (submitit/slurm/test_slurm.py mocks sbatch, sacct and
scancel behind subprocess): the driver runs unchanged, through submitit's real SlurmExecutor and its own
subprocess calls, and the test decides what each job does (`FakeSlurm.finish`). The real-Slurm tests
(test_*_slurm.py) cover the same flows on the real scheduler.

    FakeSlurm(folder).install(monkeypatch)   # PATH and the state file, for this test only
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

PROGRAMS = ("sbatch", "sacct", "squeue", "scancel", "srun")
ACTIVE = ("PENDING", "RUNNING")


@dataclass
class Refusal:
    """sbatch refuses scripts holding `match`: `stderr` is what it prints (recorded), `test_only` whether
    `sbatch --test-only` refuses too (a bad partition does; a per-user job limit only at submission)."""

    match: str
    stderr: str
    test_only: bool = False


class FakeSlurm:
    """The test's side: install the programs, refuse scripts, decide how jobs end, read what was queued."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.bin = folder / "bin"
        self.state_file = folder / "slurm.json"

    def install(self, monkeypatch) -> "FakeSlurm":
        self.bin.mkdir(parents=True, exist_ok=True)
        for name in PROGRAMS:
            program = self.bin / name
            program.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                               f"from fakeslurm import main\nsys.exit(main({name!r}, sys.argv[1:]))\n")
            program.chmod(0o755)
        self._save({"next_id": 1000, "jobs": {}, "refuse": []})
        monkeypatch.setenv("FAKE_SLURM_STATE", str(self.state_file))
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")
        return self

    def env(self) -> Dict[str, str]:
        """The environment a subprocess needs to see this Slurm (a copied command run by bash)."""
        return {**os.environ, "FAKE_SLURM_STATE": str(self.state_file),
                "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}

    def refuse(self, refusal: Refusal) -> None:
        state = self._load()
        state["refuse"].append(refusal.__dict__)
        self._save(state)

    def allow_all(self) -> None:
        state = self._load()
        state["refuse"] = []
        self._save(state)

    def jobs(self) -> Dict[str, Dict]:
        return self._load()["jobs"]

    def of_stage(self, stage: str) -> List[str]:
        """Job ids of one stage (its submitit folder, `logs/<stage>`), in submission order."""
        return [j for j, job in self.jobs().items() if job["stage"] == stage]

    def finish(self, job_id: str, state: str = "COMPLETED") -> None:
        """Job `123` (every task) or array task `123_4` ends (or starts: RUNNING) in `state`."""
        data = self._load()
        base, _, task = job_id.partition("_")
        tasks = data["jobs"][base]["tasks"]
        for t in ([task] if task else list(tasks)):
            tasks[t] = state
        self._save(data)

    def _load(self) -> Dict:
        return json.loads(self.state_file.read_text())

    def _save(self, state: Dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=1))


# ---- the programs ----------------------------------------------------------------------------------------------

def _sbatch_options(script: str) -> Dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))


def _sbatch(state: Dict, args: List[str]) -> int:
    test_only = "--test-only" in args
    files = [a for a in args if not a.startswith("-")]
    script = Path(files[0]).read_text() if files else sys.stdin.read()
    for refusal in state["refuse"]:
        if refusal["match"] in script and (refusal["test_only"] or not test_only):
            print(refusal["stderr"], end="", file=sys.stderr)
            return 1
    job_id = str(state["next_id"])
    state["next_id"] += 1
    if test_only:
        print(f"sbatch: Job {job_id} to start at 2026-11-30T00:00:00 using 1 processors on nodes fake in partition "
              f"cpu", file=sys.stderr)
        return 0
    options = _sbatch_options(script)
    array = options.get("array", "")
    n = int(array.split("-")[1].split("%")[0]) + 1 if array else 0
    state["jobs"][job_id] = {"name": options.get("job-name", ""), "comment": options.get("comment", ""),
                             "stage": Path(options.get("output", "")).parent.name, "mem": options.get("mem", ""),
                             "dependency": options.get("dependency", ""), "script": files[0] if files else "",
                             "array": bool(array), "tasks": {str(i): "PENDING" for i in range(n)} if array
                             else {"": "PENDING"}, "workdir": os.getcwd()}
    print(f"Submitted batch job {job_id}")
    return 0


def _task_ids(job_id: str, job: Dict) -> Dict[str, str]:
    return {(f"{job_id}_{t}" if job["array"] else job_id): s for t, s in job["tasks"].items()}


def _sacct(state: Dict, args: List[str]) -> int:
    """`sacct -n -P -X -j IDS -o JobID,State`: a pending array's tasks on one line, `CANCELLED by 0`."""
    wanted = args[args.index("-j") + 1].split(",")
    for job_id in wanted:
        job = state["jobs"].get(job_id)
        if job is None:
            continue
        pending = [t for t, s in job["tasks"].items() if s == "PENDING"]
        if job["array"] and len(pending) > 1:
            print(f"{job_id}_[{pending[0]}-{pending[-1]}%{len(job['tasks'])}]|PENDING")
        for task, st in _task_ids(job_id, job).items():
            if job["array"] and len(pending) > 1 and st == "PENDING":
                continue
            print(f"{task}|{'CANCELLED by 0' if st == 'CANCELLED' else st}")
    return 0


def _squeue(state: Dict, args: List[str]) -> int:
    """`squeue -h [-r] -u USER -o FORMAT` with %i, %T, %j, %o, %k."""
    fmt = args[args.index("-o") + 1]
    for job_id, job in state["jobs"].items():
        for task, st in _task_ids(job_id, job).items():
            if st in ACTIVE:
                fields = {"%i": task, "%T": st, "%j": job["name"], "%o": job["script"], "%k": job["comment"]}
                print(re.sub(r"%[iTjok]", lambda m: fields[m.group(0)], fmt))
    return 0


def _scancel(state: Dict, args: List[str]) -> int:
    for job_id in (a for a in args if not a.startswith("-")):
        base, _, task = job_id.partition("_")
        job = state["jobs"].get(base)
        if job is None:
            continue
        for t, st in job["tasks"].items():
            if st in ACTIVE and (not task or t == task):
                job["tasks"][t] = "CANCELLED"
    return 0


def main(program: str, args: List[str]) -> int:
    path = Path(os.environ["FAKE_SLURM_STATE"])
    if program == "srun":
        return 0
    state = json.loads(path.read_text())
    code = {"sbatch": _sbatch, "sacct": _sacct, "squeue": _squeue, "scancel": _scancel}[program](state, args)
    path.write_text(json.dumps(state, indent=1))
    return code
