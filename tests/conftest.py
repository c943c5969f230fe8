"""Shared fixtures: the reference data in the repository, a real Slurm, and a fake FathomNet server.

Every file a test reads lives in this repository (a fresh clone runs the suite with nothing beside it).
In CI (CI=true) a missing Slurm is an error, never a skip: .ci/run brings it up first.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from support.drills import drill_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fathompipe" / "data"  # the FathomNet 2025 files: package data, and test oracles (its README.md)
PARITY = ROOT / "tests" / "fixtures" / "parity-golden"  # the winner's own outputs on a tiny checkpoint (README.md)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def slurm_ready() -> str:
    """'' when a Slurm cluster answers here, else why not."""
    if not shutil.which("sinfo"):
        return "Slurm is not installed (run tests/infra/slurm.sh up as root)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"Slurm does not answer: {proc.stderr.strip()[:200]} (run tests/infra/slurm.sh up)"
    return ""


DRILLS: List[Dict[str, object]] = []


@pytest.fixture
def drill(request: pytest.FixtureRequest) -> Iterator[Dict[str, object]]:
    """A failure drill's record: the test fills it in as it verifies; printed after the run."""
    record: Dict[str, object] = {"drill": request.node.name.removeprefix("test_")}
    yield record
    record.setdefault("outcome", "DRILL FAILED: see the test report")
    DRILLS.append(record)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not DRILLS:
        return
    terminalreporter.write_sep("=", "failure drills")
    for line in drill_table(DRILLS):
        terminalreporter.write_line(line)
    report = os.environ.get("FATHOMPIPE_DRILL_REPORT")
    if report:
        Path(report).write_text(json.dumps(DRILLS, indent=1))


@pytest.fixture(scope="session")
def slurm() -> None:
    why = slurm_ready()
    if why:
        if IN_CI:
            pytest.fail(f"CI must run the Slurm tests: {why}")
        pytest.skip(why)


@pytest.fixture
def fake_fathomnet(tmp_path: Path):
    """Factory: serve synthetic images for (a prefix of) an annotation file; yields (server, json)."""
    from support.fakeserver import FakeFathomNet, Faults, ServerThread
    from support.synthetic import serve_dataset

    threads = []

    def start(annotations: Path, faults: Faults = Faults(), limit: int | None = None, name: str = "srv",
              server_class: type = FakeFathomNet, source_dir: Path | None = None):
        server = server_class(tmp_path / name, faults)
        thread = ServerThread(server).__enter__()
        threads.append(thread)
        out = tmp_path / f"{name}.json"
        serve_dataset(annotations, out, tmp_path / name, thread.base_url, limit=limit, source_dir=source_dir)
        return server, out

    yield start
    for t in threads:
        t.__exit__(None, None, None)


@pytest.fixture
def parity_copy(tmp_path: Path) -> Path:
    """A writable copy of the parity checkpoint (slim files are written beside it)."""
    target = tmp_path / "ckpt" / "model.ckpt"
    target.parent.mkdir()
    shutil.copyfile(PARITY / "model.ckpt", target)
    return target


def run_module(module: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, **kw)


@pytest.fixture
def run_cli():
    return run_module


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        if "slurm" in item.fixturenames:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(autouse=True)
def _no_ambient_slurm_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def private_fiftyone_database() -> Iterator[str]:
    """Every test (and every job it starts) uses a private mongod, never ~/.fiftyone's shared one."""
    from support.mongod import PrivateMongod, mongod_binary

    if mongod_binary() is None:
        if IN_CI:
            raise RuntimeError("CI must run the FiftyOne tests: no mongod (bash setup.sh installs it)")
        yield ""
        return
    mongod = PrivateMongod()
    os.environ["FIFTYONE_DATABASE_URI"] = mongod.uri
    os.environ["FIFTYONE_DATABASE_NAME"] = f"fathompipe-tests-{os.getpid()}"
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    yield mongod.uri
    database = sys.modules.get("fiftyone.core.odm.database")
    if database is not None and getattr(database, "_client", None) is not None:
        database._client.close()  # before mongod goes, or pymongo reports it at exit
    mongod.stop()


@pytest.fixture
def fiftyone_db(private_fiftyone_database: str) -> str:
    if not private_fiftyone_database:
        pytest.skip("FiftyOne's mongod is not installed (bash setup.sh)")
    return private_fiftyone_database
