"""Failure drills on the real Slurm: inject what clusters do to jobs, then status, then one command.

Each drill checks that `status` says what happened and what to do, that one command completes the
run, and measures what was redone and what was lost from evidence (tests/drill_evidence.py: the
stand-in server's request log, the part files, the final outputs against the source and a clean run);
the `drill` fixture collects the figures for the reliability table (printed after the tests, and by
bench/drills.py).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DATA, PARITY
from drill_evidence import clean_run, data_lost, images_redone, rois_redone, snapshot
from support.fakeserver import Faults
from test_pipeline_slurm import Flaky
from fathompipe.pipeline.commands import fathompipe
from support.drills import NOT_MEASURED
from pipeline_helpers import (EXPECTED_SUBMISSION, all_done, cli, job_logs, mtimes, rewritten, settled, status_json,
                              task_job, wait_for, wait_status, write_profile)

pytestmark = pytest.mark.drill


def test_download_shard_killed_mid_way(slurm, tmp_path, fake_fathomnet, parity_copy, drill):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(latency_s=1.5), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir, images = tmp_path / "run", tmp_path / "images"
    assert cli("submit", "--profile", str(profile), "download.concurrency=1").returncode == 0
    records = run_dir / "download" / "test-00001-of-00003.jsonl"
    wait_for(lambda: records.exists() and len(records.read_text().splitlines()) >= 1, "a first finished image")
    subprocess.run(["scancel", "--signal=KILL", task_job(run_dir, "download", "test/1")], check=True)  # no clean-up

    stages = wait_status(run_dir, lambda s: settled(s) and s["download"]["failed"] + s["download"]["cancelled"] == 1)
    failure = stages["download"]["failures"][0]
    assert failure["task"] == "test/1" and stages["infer"]["done"] == 0
    assert f"python -m fathompipe.resubmit --run-dir {run_dir}" in status_json(run_dir)["next"]
    at_fault = snapshot(server, images, run_dir)

    proc = cli("resubmit", "--run-dir", str(run_dir))
    assert proc.returncode == 0 and "download: submitted 1 task(s)" in proc.stdout, proc.stdout + proc.stderr
    assert all_done(wait_status(run_dir, settled))
    predictions = run_dir / "infer/test/predictions.csv"
    counts = dict(images_redone=images_redone(server, at_fault), rois_redone=rois_redone(at_fault, run_dir),
                  data_lost=data_lost(json.loads(ann.read_text()), images, server.directory, predictions,
                                      EXPECTED_SUBMISSION))
    assert not any(counts.values()) and not list(images.glob(".*.part")), counts
    drill.update(fault="SIGKILL to a running download array task (scancel --signal=KILL)",
                 outcome=f"status: shard {failure['state']}, resubmit named; resubmit reran that shard only; "
                         "run complete",
                 commands="resubmit", **counts)


def doubled_test_split(path: Path) -> Path:
    """The real test split twice over (new ids and file names): 1,576 ROIs, a run long enough to
    meet Slurm's own clock at batch size 1 on two cores."""
    raw = json.loads((DATA / "dataset_test.json").read_text())
    images = raw["images"] + [{**im, "id": im["id"] + 10**6, "file_name": "b-" + im["file_name"]}
                              for im in raw["images"]]
    anns = raw["annotations"] + [{**a, "id": a["id"] + 10**6, "image_id": a["image_id"] + 10**6}
                                 for a in raw["annotations"]]
    path.write_text(json.dumps({**raw, "images": images, "annotations": anns}))
    return path


def held_after_requeue(job: str) -> bool:
    """Slurm holds a requeued job for 120 s (pending, reason BeginTime)."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
    return out.split() == ["PENDING", "BeginTime"]


def release(job: str) -> None:
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)


def test_inference_reaches_its_time_limit_then_user_scancel(slurm, tmp_path, fake_fathomnet, parity_copy, drill):
    server, ann = fake_fathomnet(doubled_test_split(tmp_path / "test-x2.json"), Faults())
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir = tmp_path / "run"
    parts = run_dir / "infer/test/predictions.parts"
    limit = ["infer.batch_size=1", "infer.resources.timeout_min=2", "infer.resources.signal_delay_s=60"]
    assert cli("submit", "--profile", str(profile), *limit).returncode == 0

    # Slurm itself warns the job (USR2) 60-90 s before its 2-minute limit; submitit checkpoints and
    # requeues it, and Slurm holds it 120 s: released here rather than waited for.
    wait_for(lambda: (run_dir / "run.json").exists() and "infer" in json.loads((run_dir / "run.json").read_text())
             ["stages"], "the infer job id")
    job = task_job(run_dir, "infer", "test/0")
    wait_for(lambda: held_after_requeue(job), "Slurm's time-limit warning and the requeue", timeout=600, every=1)
    at_limit = snapshot(server, tmp_path / "images", run_dir)
    release(job)
    wait_for(lambda: len(mtimes(parts, "*.npz")) >= len(at_limit.parts) + 5, "inference to resume", timeout=300)
    assert f"{len(at_limit.parts)} already done" in job_logs(run_dir, "infer")
    redone_after_limit = rois_redone(at_limit, run_dir)
    assert redone_after_limit == 0

    at_cancel = snapshot(server, tmp_path / "images", run_dir)  # the user now cancels the job by hand
    subprocess.run(["scancel", job], check=True)
    stages = wait_status(run_dir, lambda s: settled(s) and s["infer"]["cancelled"] == 1)
    assert stages["infer"]["failures"][0]["state"] == "CANCELLED" and stages["evaluate"]["done"] == 0
    assert f"python -m fathompipe.resubmit --run-dir {run_dir}" in status_json(run_dir)["next"]

    proc = cli("resubmit", "--run-dir", str(run_dir))
    assert proc.returncode == 0 and "infer: submitted 1 task(s)" in proc.stdout, proc.stdout + proc.stderr
    assert "download: nothing to do" in proc.stdout
    # The 2-minute limit has done its part. The resubmitted job gets room to finish, as a real limit
    # (hours) gives: at batch size 1 on a busy 2-core machine, four 2-minute windows (submitit's three
    # requeues) may not cover the rest of the run.
    job = task_job(run_dir, "infer", "test/0")
    subprocess.run(["scontrol", "update", f"jobid={job}", "TimeLimit=60"], check=True)

    def settled_releasing_holds(stages: dict) -> bool:  # should it meet its limit all the same
        if held_after_requeue(job):
            release(job)
        return settled(stages)

    assert all_done(wait_status(run_dir, settled_releasing_holds, timeout=3600))
    predictions = run_dir / "infer/test/predictions.csv"
    clean = clean_run(parity_copy, ann, tmp_path / "images", tmp_path / "clean", PARITY / "tiny_dinov2_config.json")
    counts = dict(images_redone=images_redone(server, at_limit),
                  rois_redone=redone_after_limit + rois_redone(at_cancel, run_dir),
                  data_lost=data_lost(json.loads(ann.read_text()), tmp_path / "images", server.directory, predictions,
                                      clean))
    requeues = job_logs(run_dir, "infer").count("Job has timed out")
    assert not any(counts.values()) and requeues >= 1, counts
    rois = len(predictions.read_text().splitlines()) - 1
    drill.update(fault="the inference job reaches its 2-minute time limit (Slurm's own USR2 warning), "
                       "then the user scancels it",
                 outcome=f"{requeues} requeue(s), each resumed after the last finished batch (first after "
                         f"{len(at_limit.parts)} batches); status: CANCELLED, resubmit named; resubmit resumed "
                         f"after {len(at_cancel.parts)} batches of {rois} ROIs",
                 commands="none for the time limit; resubmit after scancel", **counts)


def test_truncated_checkpoint(slurm, tmp_path, fake_fathomnet, drill):
    # a slow server: downloads are still in flight when the checkpoint job finds the file truncated
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(latency_s=1.0), source_dir=PARITY / "images")
    shutil.copyfile(PARITY / "model.ckpt", server.directory / "model.ckpt")  # a mirror, standing in for Drive
    mirror = json.loads(ann.read_text())["images"][0]["coco_url"].rsplit("/", 1)[0] + "/model.ckpt"
    good = (PARITY / "model.ckpt").read_bytes()
    checkpoint = tmp_path / "ckpt" / "model.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(good[: len(good) // 2])  # a copy cut short
    profile = write_profile(tmp_path, ann, checkpoint, "slurm")
    run_dir = tmp_path / "run"
    assert cli("submit", "--profile", str(profile), "download.concurrency=1",
               f"checkpoint.url={mirror}").returncode == 0
    aside = tmp_path / "ckpt/model.ckpt.corrupt"
    wait_for(aside.exists, "the checkpoint job to find the file truncated", timeout=300)
    at_fault = snapshot(server, tmp_path / "images", run_dir)  # the moment the fault is found: images on disk

    assert all_done(wait_status(run_dir, settled))
    predictions = run_dir / "infer/test/predictions.csv"
    # inference waits for the checkpoint job, so no part file exists at the fault: ROIs redone is no measure of
    # this drill, and the table says so instead of showing a 0 that could not be anything else
    assert not at_fault.parts
    counts = dict(images_redone=images_redone(server, at_fault), rois_redone=NOT_MEASURED,
                  data_lost=data_lost(json.loads(ann.read_text()), tmp_path / "images", server.directory, predictions,
                                      EXPECTED_SUBMISSION))
    assert counts["images_redone"] == 0 and counts["data_lost"] == 0, counts
    assert checkpoint.read_bytes() == good and server.requests["model.ckpt"] == 1
    assert (tmp_path / "ckpt/model.ckpt.corrupt").stat().st_size == len(good) // 2  # kept, not deleted
    log = job_logs(run_dir, "checkpoint")
    assert "truncated or corrupt" in log and "model.ckpt.corrupt" in log
    drill.update(fault="checkpoint truncated to half its bytes before submit",
                 outcome="checkpoint job moved it to .corrupt, fetched a fresh copy, verified it; run complete",
                 commands="none (the same submit)", **counts)


def test_run_json_damaged_then_rebuilt(slurm, tmp_path, fake_fathomnet, parity_copy, drill):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(retry_after_s=0), server_class=Flaky,
                                 source_dir=PARITY / "images")
    Flaky.broken = {json.loads(ann.read_text())["images"][1]["file_name"]}  # shard 1 fails: work is left to do
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir = tmp_path / "run"
    assert cli("submit", "--profile", str(profile)).returncode == 0
    wait_status(run_dir, lambda s: settled(s) and s["download"]["failed"] == 1)
    at_fault = snapshot(server, tmp_path / "images", run_dir)
    markers = mtimes(run_dir / "download", "*.done")
    scripts = len(list((run_dir / "logs").rglob("*_submission.sh")))

    run_json = run_dir / "run.json"
    run_json.write_text('{"cluster": "slurm", "stag')  # cut short
    for damage in ("corrupt", "missing"):
        proc = cli("submit", "--profile", str(profile))
        assert proc.returncode == 1 and f"run.json is {damage}" in proc.stderr
        assert "Nothing was submitted" in proc.stderr
        assert f"exactly: {fathompipe('submit', '--profile', str(profile), '--rebuild-state')}" in proc.stderr
        assert len(list((run_dir / "logs").rglob("*_submission.sh"))) == scripts  # no duplicate submission
        run_json.unlink(missing_ok=True)
    status = cli("status", "--run-dir", str(run_dir))
    assert status.returncode == 1 and "--rebuild-state" in status.stderr

    Flaky.broken = set()
    proc = cli("submit", "--profile", str(profile), "--rebuild-state")
    assert proc.returncode == 0 and "rebuilt the state" in proc.stdout, proc.stdout + proc.stderr
    assert "download: submitted 1 task(s)" in proc.stdout and "checkpoint: nothing to do" in proc.stdout
    assert all_done(wait_status(run_dir, settled))
    assert not rewritten(markers, run_dir / "download")
    predictions = run_dir / "infer/test/predictions.csv"
    counts = dict(images_redone=images_redone(server, at_fault), rois_redone=rois_redone(at_fault, run_dir),
                  data_lost=data_lost(json.loads(ann.read_text()), tmp_path / "images", server.directory, predictions,
                                      EXPECTED_SUBMISSION))
    assert not any(counts.values()), counts
    drill.update(fault="run.json cut short, then deleted, with a failed shard still to redo",
                 outcome="submit refused both times naming the fix, nothing submitted; --rebuild-state "
                         "checked squeue, resumed from the markers; run complete",
                 commands="submit --rebuild-state", **counts)


def test_database_unreachable_when_evaluate_starts(slurm, fiftyone_db, tmp_path, fake_fathomnet, parity_copy, drill):
    from support.mongod import PrivateMongod

    down = PrivateMongod()
    port = down.port
    down.stop()  # the database the profile names is now unreachable
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    uri = f"mongodb://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    assert cli("submit", "--profile", str(profile), f"evaluate.database_uri={uri}").returncode == 0
    stages = wait_status(run_dir, lambda s: settled(s) and s["evaluate"]["failed"] == 1)
    assert stages["infer"]["done"] == 1
    assert f"cannot reach the MongoDB at {uri}" in stages["evaluate"]["failures"][0]["last_line"]
    assert f"python -m fathompipe.resubmit --run-dir {run_dir}" in status_json(run_dir)["next"]
    assert (run_dir / "evaluate/test/report.html").exists()  # the report did not wait for the database

    up = PrivateMongod(port=port)  # the database is back
    try:
        at_fault = snapshot(server, tmp_path / "images", run_dir)
        proc = cli("resubmit", "--run-dir", str(run_dir))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "infer: nothing to do" in proc.stdout and "evaluate: submitted 1 task(s)" in proc.stdout
        assert all_done(wait_status(run_dir, settled))
    finally:
        up.stop()
    predictions = run_dir / "infer/test/predictions.csv"
    counts = dict(images_redone=images_redone(server, at_fault), rois_redone=rois_redone(at_fault, run_dir),
                  data_lost=data_lost(json.loads(ann.read_text()), tmp_path / "images", server.directory, predictions,
                                      EXPECTED_SUBMISSION))
    assert not any(counts.values()), counts
    drill.update(fault="FiftyOne's MongoDB down when the evaluate job starts",
                 outcome="report written anyway; status: evaluate FAILED with 'cannot reach the MongoDB', "
                         "resubmit named; resubmit ran evaluate only; run complete",
                 commands="resubmit", **counts)
