"""The driver on the real Slurm: submit, a shard fails, status says so, resubmit, everything done."""
from __future__ import annotations

import json
import time

import pytest

from conftest import PARITY
from drill_evidence import data_lost, images_redone, rois_redone, snapshot
from support.fakeserver import FakeFathomNet, Faults
from pipeline_helpers import (EXPECTED_SUBMISSION, all_done, cli, settled, squeue_jobs, status_json,
                              wait_status, write_profile)


class Flaky(FakeFathomNet):
    """Answers 503 for some files while `broken` holds them."""

    broken: set = set()

    def _draw(self, name: str, attempt: int):
        return "http_503" if name in self.broken else super()._draw(name, attempt)


def test_full_graph_failure_status_resubmit(slurm, tmp_path, fake_fathomnet, parity_copy):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(retry_after_s=0), server_class=Flaky,
                                 source_dir=PARITY / "images")
    # image ids sort 1..12 and shards deal round-robin: image 2 is in shard 1
    victim = json.loads(ann.read_text())["images"][1]["file_name"]
    Flaky.broken = {victim}
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir = tmp_path / "run"

    proc = cli("submit", "--profile", str(profile))
    assert proc.returncode == 0, proc.stderr
    assert "download: submitted 3 task(s)" in proc.stdout and "infer: submitted 1 task(s)" in proc.stdout
    assert "after afterok:" in proc.stdout

    stages = wait_status(run_dir, lambda s: settled(s) and s["download"]["failed"] == 1)
    assert stages["download"]["done"] == 2 and stages["checkpoint"]["done"] == 1
    assert stages["infer"]["done"] == 0 and stages["infer"]["cancelled"] == 1  # its dependency can never be met
    assert stages["infer"]["failures"][0]["log"] == ""  # it never ran: no log to point at
    failure = stages["download"]["failures"][0]
    assert failure["task"] == "test/1" and failure["log"].endswith("_1_0_log.err")
    assert failure["causes"] == {"HTTP 503": 1}
    assert failure["last_line"].startswith(
        "fathompipe.pipeline.graph.StageFailed: shard test-00001-of-00003: INCOMPLETE")
    assert "causes: HTTP 503 x1" in failure["last_line"]
    state = json.loads((run_dir / "run.json").read_text())
    ours = {s["job_id"] for st in state["stages"].values() for s in st["submissions"]}
    deadline = time.monotonic() + 60  # finished jobs may take a moment to leave the queue
    while [ln for ln in squeue_jobs("") if ln.split("_")[0].split()[0] in ours]:
        assert time.monotonic() < deadline, "jobs left waiting on a dependency that can never be met"
        time.sleep(1)
    text = cli("status", "--run-dir", str(run_dir))
    assert text.returncode == 1 and f"python -m fathompipe.resubmit --run-dir {run_dir}" in text.stdout
    assert "causes: HTTP 503 x1" in text.stdout and "infer test/0: job" in text.stdout
    assert "(never ran: no log)" in text.stdout

    markers = {p: p.stat().st_mtime_ns for p in (run_dir / "download").glob("*.done")}
    slim_meta = parity_copy.with_name("model.inference.json")
    slim_mtime = slim_meta.stat().st_mtime_ns

    Flaky.broken = set()
    proc = cli("resubmit", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "download: submitted 1 task(s)" in proc.stdout and "checkpoint: nothing to do" in proc.stdout
    stages = wait_status(run_dir, lambda s: settled(s))
    assert all_done(stages), stages
    assert status_json(run_dir)["next"].startswith("all stages complete. Reports: ")

    predictions = run_dir / "infer" / "test" / "predictions.csv"
    assert predictions.read_text() == EXPECTED_SUBMISSION.read_text()
    assert {p: p.stat().st_mtime_ns for p in markers} == markers  # finished shards did not run again
    assert slim_meta.stat().st_mtime_ns == slim_mtime
    state = json.loads((run_dir / "run.json").read_text())
    resub = state["stages"]["download"]["submissions"][-1]
    assert resub["reason"] == "resubmit" and list(resub["tasks"]) == ["test/1"]
    assert [h["action"] for h in state["history"]] == ["submit", "resubmit"]

    again = cli("submit", "--profile", str(profile))
    assert again.returncode == 0 and "resuming" in again.stdout
    assert "download: nothing to do" in again.stdout and "infer: nothing to do" in again.stdout


@pytest.mark.drill
def test_user_cancel_then_resubmit(slurm, tmp_path, fake_fathomnet, parity_copy, drill):
    # a slow server: the downloads are still running when the user cancels
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(latency_s=2.0), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir = tmp_path / "run"
    proc = cli("submit", "--profile", str(profile), "download.concurrency=1")
    assert proc.returncode == 0, proc.stderr
    wait_status(run_dir, lambda s: s["download"]["running"] >= 1, timeout=60)
    cancel = cli("cancel", "--run-dir", str(run_dir))
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout and "resubmit" in cancel.stdout
    stages = wait_status(run_dir, lambda s: settled(s) and s["download"]["cancelled"] >= 1, timeout=120)
    assert "CANCELLED" in {f["state"] for s in stages.values() for f in s["failures"]}
    assert sum(s["failed"] for s in stages.values()) == 0  # the user's cancel reads as cancelled, not failed
    assert stages["infer"]["done"] == 0 and "fathompipe.resubmit" in status_json(run_dir)["next"]
    state = json.loads((run_dir / "run.json").read_text())
    assert state["history"][-1]["action"] == "cancel"
    at_fault = snapshot(server, tmp_path / "images", run_dir)
    proc = cli("resubmit", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    stages = wait_status(run_dir, settled)
    assert all_done(stages), stages
    predictions = run_dir / "infer/test/predictions.csv"
    counts = dict(images_redone=images_redone(server, at_fault), rois_redone=rois_redone(at_fault, run_dir),
                  data_lost=data_lost(json.loads(ann.read_text()), tmp_path / "images", server.directory, predictions,
                                      EXPECTED_SUBMISSION))
    assert not any(counts.values()), counts
    drill.update(fault="python -m fathompipe.cancel while the download array runs",
                 outcome="every queued and running job cancelled and recorded; status: CANCELLED, resubmit "
                         "named; resubmit completed the run", commands="resubmit", **counts)


def test_second_submit_leaves_queued_work_alone(slurm, tmp_path, fake_fathomnet, parity_copy):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir = tmp_path / "run"
    queued = "download.resources.extra={begin: now+1hour}"  # stays queued
    assert cli("submit", "--profile", str(profile), queued).returncode == 0
    try:
        wait_status(run_dir, lambda s: s["download"]["pending"] == 3, timeout=60)
        again = cli("submit", "--profile", str(profile), queued)
        assert again.returncode == 0, again.stderr
        assert "download: nothing to do (3 task(s) still queued or running)" in again.stdout
        state = json.loads((run_dir / "run.json").read_text())
        assert len(state["stages"]["download"]["submissions"]) == 1  # nothing submitted twice
        (run_dir / "run.json").unlink()  # and with its state lost, rebuilding it is refused too
        rebuild = cli("submit", "--profile", str(profile), queued, "--rebuild-state")
        assert rebuild.returncode == 1 and "refusing to rebuild" in rebuild.stderr and "scancel" in rebuild.stderr
        ids = {sub["job_id"] for sub in state["stages"]["download"]["submissions"]}
        assert any(i.split("_")[0] in ids for i in rebuild.stderr.split("job(s) ")[1].split(" of")[0].split(", "))
        (run_dir / "run.json").write_text(json.dumps(state))  # so that cancel below finds the jobs
    finally:
        assert cli("cancel", "--run-dir", str(run_dir)).returncode == 0
