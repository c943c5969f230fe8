"""Recovery on the real Slurm (accounting enforced): a stage refused mid-graph is completed by the same
submit after the fix, and a shard killed while the rest of its array runs is resubmitted at once."""
from __future__ import annotations

import json
import subprocess
from datetime import datetime

from conftest import PARITY
from fathompipe.pipeline.commands import fathompipe
from support.fakeserver import Faults
from pipeline_helpers import (EXPECTED_SUBMISSION, all_done, cli, settled, status_json, task_job, wait_status,
                              write_profile)


def sacct_times(job_ids: list) -> dict:
    """job or array task id -> (start, end) from accounting."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(bases), "-o", "JobID,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    times = {}
    for line in out.splitlines():
        jid, start, end = line.split("|")
        if start[:1].isdigit() and end[:1].isdigit():
            times[jid] = (datetime.fromisoformat(start), datetime.fromisoformat(end))
    return times


def test_refused_mid_graph_then_completed_by_the_same_submit(slurm, tmp_path, fake_fathomnet, parity_copy):
    # fathompipe-3jobs admits 3 queued jobs per user: each script passes sbatch --test-only alone, but with the
    # 3 download tasks queued, the infer job is refused by the real sbatch
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(latency_s=1.0), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir = tmp_path / "run"
    limited = ["download.concurrency=1", "download.resources.account=fathompipe",
               "download.resources.qos=fathompipe-3jobs", "infer.resources.account=fathompipe"]
    proc = cli("submit", "--profile", str(profile), *limited, "infer.resources.qos=fathompipe-3jobs")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "download: submitted 3 task(s)" in proc.stdout and "checkpoint: submitted 1 task(s)" in proc.stdout
    assert "infer: not submitted: sbatch refused it" in proc.stdout and "infer.resources.qos" in proc.stdout
    assert "evaluate: not submitted: waits for infer" in proc.stdout
    assert "Traceback" not in proc.stderr and "python -m fathompipe.submit --profile" in proc.stderr
    st = status_json(run_dir)
    stages = {s["stage"]: s for s in st["stages"]}
    assert stages["infer"]["not_submitted"] == 1
    assert "QOSMaxSubmitJobPerUserLimit" in stages["infer"]["not_submitted_reason"]
    assert stages["evaluate"]["not_submitted"] == 1
    assert "infer not submitted: sbatch refused it" in st["next"] and "in progress" not in st["next"]
    assert "change infer.resources.qos on the command line (infer.resources.qos=fathompipe-3jobs)" in st["next"]
    assert st["command"] == fathompipe("submit", "--profile", str(profile), *limited,
                                       "infer.resources.qos=fathompipe-3jobs")  # the refused command, to edit

    # the fix changes only resources of stages without finished work: the same command with it completes the run
    fixed = cli("submit", "--profile", str(profile), *limited, "infer.resources.qos=fathompipe")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "resources changed for work not yet done: infer.resources.qos" in fixed.stdout
    assert "infer: submitted 1 task(s)" in fixed.stdout and "evaluate: submitted" in fixed.stdout
    assert "download: submitted" not in fixed.stdout  # queued or finished work is never submitted twice
    stages = wait_status(run_dir, settled, timeout=400)
    assert all_done(stages), stages
    assert (run_dir / "infer/test/predictions.csv").read_text() == EXPECTED_SUBMISSION.read_text()
    state = json.loads((run_dir / "run.json").read_text())
    assert [len(state["stages"][s]["submissions"]) for s in ("download", "checkpoint", "infer")] == [1, 1, 1]

    # a data key still refuses
    other = cli("submit", "--profile", str(profile), *limited, "infer.resources.qos=fathompipe", "infer.batch_size=2")
    assert other.returncode == 1 and "infer.batch_size" in other.stderr


def test_killed_shard_resubmitted_while_the_array_runs(slurm, tmp_path, fake_fathomnet, parity_copy):
    # a shard is 3 images at 8 s each: the other shards still run when the killed one is resubmitted
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(latency_s=8.0), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir = tmp_path / "run"
    proc = cli("submit", "--profile", str(profile), "download.num_shards=4", "download.concurrency=1",
               "download.resources.array_parallelism=4")
    assert proc.returncode == 0, proc.stderr
    wait_status(run_dir, lambda s: s["download"]["running"] == 4, timeout=120)
    victim = task_job(run_dir, "download", "test/1")
    subprocess.run(["scancel", victim], check=True)
    stages = wait_status(run_dir, lambda s: s["download"]["cancelled"] == 1, timeout=60)
    running_then = stages["download"]["running"]
    assert running_then >= 1, stages  # the others are still running when the shard is resubmitted

    again = cli("resubmit", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "download: submitted 1 task(s)" in again.stdout and "left alone" in again.stdout
    state = json.loads((run_dir / "run.json").read_text())
    new_shard = state["stages"]["download"]["submissions"][-1]
    assert list(new_shard["tasks"]) == ["test/1"]
    infer = state["stages"]["infer"]["submissions"][-1]
    waits_on = infer["dependency"].removeprefix("afterok:").split(":")
    old_array = victim.split("_")[0]
    assert new_shard["job_id"] in waits_on  # the new shard job
    others = [j for j in waits_on if j != new_shard["job_id"] and j != task_job(run_dir, "checkpoint", "checkpoint")]
    assert others and all(j.startswith(old_array + "_") and j != victim for j in others)  # old tasks still running

    stages = wait_status(run_dir, settled, timeout=400)
    assert all_done(stages), stages
    assert (run_dir / "infer/test/predictions.csv").read_text() == EXPECTED_SUBMISSION.read_text()
    shards = [task_job(run_dir, "download", f"test/{i}") for i in range(4)]
    times = sacct_times(shards + [task_job(run_dir, "infer", "test/0")])
    infer_start = times[task_job(run_dir, "infer", "test/0")][0]
    assert all(infer_start >= times[j][1] for j in shards)  # infer waited for every shard, old and new
