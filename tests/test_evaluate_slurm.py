"""The evaluate stage on the real Slurm: both splits with fathompipe's private database (FiftyOne's mongod
on a socket only the user can open, started and stopped by the job), and a FiftyOne Enterprise deployment
whose key must never reach a file, a log or status output."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

from conftest import PARITY, ROOT
from fathompipe.evaluation.private_database import state_dir
from support.fakeserver import Faults
from support.mongod import PrivateMongod
from pipeline_helpers import all_done, settled, wait_status, write_profile

PLANTED_KEY = "planted-fo-key-7f3a91c2e4"


def labelled_copy(annotations: Path, out: Path) -> Path:
    """The parity set with a category on every box: a stand-in train split whose image and annotation
    ids (1..12, 1..30) collide with the test split's, as FathomNet 2025's do."""
    raw = json.loads(annotations.read_text())
    for i, a in enumerate(raw["annotations"]):
        a["category_id"] = raw["categories"][i % len(raw["categories"])]["id"]
    out.write_text(json.dumps(raw))
    return out


def two_split_profile(tmp_path: Path, fake_fathomnet, parity_copy: Path, **evaluate: object) -> Path:
    _, test_ann = fake_fathomnet(PARITY / "dataset.json", Faults(), name="srv-test", source_dir=PARITY / "images")
    _, train_ann = fake_fathomnet(labelled_copy(PARITY / "dataset.json", tmp_path / "train-src.json"), Faults(),
                                  name="srv-train", source_dir=PARITY / "images")
    path = write_profile(tmp_path, test_ann, parity_copy, "slurm")
    profile = json.loads(path.read_text())
    profile["data"]["splits"] = ["train", "test"]
    profile["data"]["train"] = {"annotations": str(train_ann), "images_dir": str(tmp_path / "train_images")}
    profile["evaluate"] = {"dataset": "fathomnet-2025", **evaluate,
                           "resources": {"cpus_per_task": 1, "mem_gb": 3, "timeout_min": 20}}
    path.write_text(json.dumps(profile))
    return path


def fathompipe(module: str, *args: str, env: Dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"fathompipe.{module}", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_train_and_test_with_the_private_database(slurm, tmp_path, fake_fathomnet, parity_copy):
    """No FIFTYONE_DATABASE_URI: the job starts FiftyOne's mongod on FIFTYONE_DATABASE_DIR, on a Unix socket only,
    with a WiredTiger cache of a quarter of the job's memory, and stops it when it ends. Two evaluate tasks would
    start two mongods on that directory; the stage is one task evaluating both splits in turn."""
    from pymongo import MongoClient

    profile = two_split_profile(tmp_path, fake_fathomnet, parity_copy)
    db_dir = tmp_path / "fiftyone-db"
    env = {k: v for k, v in os.environ.items() if k not in ("FIFTYONE_DATABASE_URI", "FIFTYONE_DATABASE_NAME")}
    env["FIFTYONE_DATABASE_DIR"] = str(db_dir)
    run_dir = tmp_path / "run"
    proc = fathompipe("submit", "--profile", str(profile), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "evaluate: submitted 1 task(s)" in proc.stdout
    stages = wait_status(run_dir, settled, timeout=1800)
    assert all_done(stages) and not any(s["failed"] for s in stages.values()), json.dumps(stages, indent=1)
    assert stages["evaluate"]["items"] == {"reports": 2}
    for split in ("train", "test"):
        assert (run_dir / "evaluate" / split / "evaluate.done").exists()
    log = "".join(p.read_text() for p in (run_dir / "logs" / "evaluate").glob("*_log.out"))
    assert f"fathompipe's private database (FiftyOne's mongod on {db_dir}, reachable by this user only" in log
    assert "WiredTiger cache 0.75 GB" in log and "ServiceListenTimeout" not in log  # mem_gb 3
    started = [json.loads(line) for line in (db_dir / "log" / "mongo.log").read_text().splitlines()
               if '"Options set by command line"' in line]
    assert [s["attr"]["options"]["storage"]["wiredTiger"]["engineConfig"]["cacheSizeGB"] for s in started] == [0.75]
    bind = started[0]["attr"]["options"]["net"]["bindIp"]
    assert bind.startswith("/tmp/fathompipe-") and bind.endswith("/mongod.sock")  # a socket path only, no address

    mongod = open_when_released(db_dir)  # the directory the job's mongod wrote, opened afterwards
    try:
        db = MongoClient(mongod.uri)["fiftyone"]
        collection = db[db.datasets.find_one({"name": "fathomnet-2025"})["sample_collection_name"]]
        for split in ("train", "test"):
            docs = list(collection.find({"split": split}))
            assert len(docs) == 12
            for doc in docs:
                truth = {d["annotation_id"] for d in doc["ground_truth"]["detections"]}
                assert {d["annotation_id"] for d in doc["model_predictions"]["detections"]} == truth
        assert collection.count_documents({}) == 24
        assert set(db.datasets.find_one({"name": "fathomnet-2025"})["evaluations"]) == {"eval_model_train"}
    finally:
        mongod.stop()
        shutil.rmtree(state_dir(db_dir), ignore_errors=True)  # the job's socket directory in /tmp


def open_when_released(db_dir: Path, timeout: float = 180) -> PrivateMongod:
    """A mongod on `db_dir` once the job's own bundled mongod has let it go: FiftyOne's service stops
    its mongod a little after the last client process exits, so the directory can still be locked."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return PrivateMongod(dbpath=db_dir)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_deployment_key_never_leaves_the_job(slurm, tmp_path, fake_fathomnet, parity_copy):
    """A deployment NAME in the profile, its URI and key in .env: read inside the job only. With the
    open-source package installed the job stops with a clear error naming the deployment, never the key."""
    env_file = tmp_path / "secrets" / ".env"
    env_file.parent.mkdir()
    env_file.write_text(f"LAB_FIFTYONE_API_URI=https://lab.fiftyone.invalid\nLAB_FIFTYONE_API_KEY={PLANTED_KEY}\n")
    profile = two_split_profile(tmp_path, fake_fathomnet, parity_copy, deployment="lab", env_file=str(env_file))
    env = dict(os.environ)
    run_dir = tmp_path / "run"
    outputs = [fathompipe("submit", "--profile", str(profile), "--dry-run", env=env)]
    outputs.append(fathompipe("submit", "--profile", str(profile), env=env))
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    stages = wait_status(run_dir, lambda s: settled(s) and s["evaluate"]["failed"] == 1, timeout=1800)
    assert stages["infer"]["done"] == 2
    line = stages["evaluate"]["failures"][0]["last_line"]
    assert "deployment 'lab' (https://lab.fiftyone.invalid) selects FiftyOne Enterprise" in line, line
    outputs.append(fathompipe("status", "--run-dir", str(run_dir), env=env))
    outputs.append(fathompipe("status", "--run-dir", str(run_dir), "--json", env=env))
    assert "lab" in (run_dir / "config.yaml").read_text()

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".sh", ".pkl", ".out", ".err", ".json", ".yaml"} <= kinds  # sbatch scripts, pickles, logs, state
    leaked = [str(p) for p in files if PLANTED_KEY.encode() in p.read_bytes()]
    leaked += [" ".join(o.args[2:4]) for o in outputs if PLANTED_KEY in o.stdout + o.stderr]
    assert not leaked
