"""The driver's decisions as pure functions, against recorded sbatch/sacct/squeue output (seconds, no Slurm).
The real-Slurm tests (test_*_slurm.py) cover the same behaviour end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from fathompipe.config import load_config
from fathompipe.pipeline.submission import (SubmitError, config_differences, plan_dependency, plan_submission,
                                            refused_change)
from fathompipe.layout import RunPaths
from fathompipe.resubmit import selected_shards
from fathompipe.pipeline.scheduler import (afterok, expand_job_id, job_sort_key, keys_to_change, last_error_line,
                                           parse_sacct, parse_squeue, rejection_reason)
from fathompipe.pipeline.graph import STAGES, job_name

GRAPH = [(s.name, s.after) for s in STAGES]

# `sacct -n -P -X -j 98,99,100,101 -o JobID,State` on slurm-wlm 22.05, recorded
SACCT = """98_[2-3%2]|PENDING
98_0|RUNNING
98_1|CANCELLED by 0
99|CANCELLED by 0
100|COMPLETED
101|FAILED
"""
# `squeue -h -r -u root -o %i|%T`, recorded a moment later: 98_2 started since
SQUEUE = """98_2|RUNNING
98_3|PENDING
98_0|RUNNING
102|PENDING
"""
# sbatch's stderr when refused, recorded on the enforcing test cluster
SBATCH_PARTITION = ("sbatch: error: invalid partition specified: gpu-rtx6000\n"
                    "sbatch: error: Batch job submission failed: Invalid partition name specified\n")
SBATCH_QOS_LIMIT = "sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: Job " \
                   "violates accounting/QOS policy (job submit limit, user's size and/or time limits)\n"
TEST_ONLY_MEMORY = "allocation failure: Memory required by task is not available\n"
TEST_ONLY_ACCOUNT = "allocation failure: Invalid account or account/partition combination specified\n"
TEST_ONLY_GPUS = "allocation failure: Requested node configuration is not available\n"


def test_sacct_states_of_array_tasks_and_cancelled_jobs():
    states = parse_sacct(SACCT, ["98_0", "98_1", "98_2", "98_3", "99_0", "100", "101"])
    assert states["98_1"] == "CANCELLED" and states["99_0"] == "CANCELLED"  # "by 0" dropped; array cancelled whole
    assert states["98_2"] == states["98_3"] == "PENDING" and states["98_0"] == "RUNNING"
    assert states["100"] == "COMPLETED" and states["101"] == "FAILED"


def test_squeue_overlays_lagging_sacct():
    states = {**parse_sacct(SACCT, ["98_2"]), **parse_squeue(SQUEUE)}
    assert states["98_2"] == "RUNNING" and states["102"] == "PENDING"
    assert expand_job_id("7_[0-2,5%4]") == ["7_0", "7_1", "7_2", "7_5"]


def test_job_ids_sort_numerically_and_dependencies():
    assert sorted(["100", "99", "98_10", "98_2"], key=job_sort_key) == ["98_2", "98_10", "99", "100"]
    assert afterok(["100", "99_3", "99_10"]) == "afterok:99_3:99_10:100" and afterok([]) == ""


def test_dependency_on_new_jobs_and_live_array_tasks():
    upstream = {"download:test/0": "98_0", "download:test/1": "98_1", "checkpoint:checkpoint": "97"}
    dep, never = plan_dependency(upstream, {"download:test/1": "103"}, live={"98_0", "97"})
    assert dep == "afterok:97:98_0:103" and never == []
    dep, never = plan_dependency(upstream, {}, live={"98_0", "97"})
    assert dep is None and never == ["download:test/1"]


def test_killed_shard_is_resubmitted_while_the_rest_runs():
    # 98_1 was scancelled; kill-on-invalid-dep then cancelled infer (99) and evaluate (100)
    states = parse_sacct(SACCT.replace("100|COMPLETED", "100|CANCELLED by 0"), ["98_0", "98_1", "98_2", "98_3"])
    unfinished = {"download": {f"test/{i}": f"98_{i}" for i in range(4)}, "checkpoint": {},
                  "infer": {"test/0": "99"}, "evaluate": {"test": "100"}}
    submit, cancel = plan_submission(GRAPH, unfinished, states)
    assert submit == {"download": ["test/1"], "infer": ["test/0"], "evaluate": ["test"]} and cancel == []


def test_pending_downstream_is_rechained_running_and_unrelated_left_alone():
    states = {"98_0": "RUNNING", "98_1": "FAILED", "99": "PENDING", "100": "PENDING"}
    unfinished = {"download": {"test/0": "98_0", "test/1": "98_1"}, "infer": {"test/0": "99"},
                  "evaluate": {"test": "100"}}
    submit, cancel = plan_submission(GRAPH, unfinished, states)
    assert submit == {"download": ["test/1"], "infer": ["test/0"], "evaluate": ["test"]}
    assert cancel == ["99", "100"]
    # nothing upstream to redo: the waiting jobs stay as they are
    calm = {"98_0": "RUNNING", "98_1": "RUNNING", "99": "PENDING", "100": "PENDING"}
    assert plan_submission(GRAPH, unfinished, calm) == ({}, [])
    # --shards limits the first stage
    submit, _ = plan_submission(GRAPH, {"download": {"test/0": "98_0", "test/1": "98_1"}},
                                {"98_0": "FAILED", "98_1": "FAILED"}, {"download": {"test/0"}})
    assert submit == {"download": ["test/0"]}


def test_never_submitted_tasks_are_submitted():
    unfinished = {"download": {"test/0": "98_0"}, "infer": {"test/0": None}, "evaluate": {"test": None}}
    submit, cancel = plan_submission(GRAPH, unfinished, {"98_0": "RUNNING"})
    assert submit == {"infer": ["test/0"], "evaluate": ["test"]} and cancel == []


@pytest.mark.parametrize("stderr, reason, key", [
    (SBATCH_PARTITION, "invalid partition specified: gpu-rtx6000", "partition"),
    (SBATCH_QOS_LIMIT, "QOSMaxSubmitJobPerUserLimit", "qos"),
    (TEST_ONLY_MEMORY, "Memory required by task is not available", "mem_gb"),
    (TEST_ONLY_ACCOUNT, "Invalid account", "account"),
    (TEST_ONLY_GPUS, "Requested node configuration is not available", "gpus_per_node"),
])
def test_sbatch_rejection_names_the_profile_key(stderr, reason, key):
    why = rejection_reason(stderr)
    assert reason in why and "sbatch:" not in why
    assert key in keys_to_change(why)


def test_only_resources_of_unstarted_stages_may_change():
    old = {"infer": {"batch_size": 64, "resources": {"partition": "gpu-rtx6000", "mem_gb": 48}},
           "download": {"resources": {"mem_gb": 2}}}
    new = {"infer": {"batch_size": 64, "resources": {"partition": "gpu-a100", "mem_gb": 48}},
           "download": {"resources": {"mem_gb": 4}}}
    diffs = config_differences(old, new)
    assert [d[0] for d in diffs] == ["download.resources.mem_gb", "infer.resources.partition"]
    assert refused_change(diffs, started=set()) is None
    assert "download has finished work" in refused_change(diffs, started={"download"})
    data = config_differences(old, {**new, "infer": {**new["infer"], "batch_size": 32}})
    assert "infer.batch_size" in refused_change(data, started=set())


def test_stage_and_run_visible_in_squeues_8_character_name():
    names = {run: [job_name(Path(f"/scratch/runs/{run}"), s.name) for s in STAGES] for run in ("fathomnet", "trial2")}
    assert [n[:8] for n in names["fathomnet"]] == ["dl.fatho", "ck.fatho", "in.fatho", "ev.fatho"]
    assert [n[:8] for n in names["trial2"]] == ["dl.trial", "ck.trial", "in.trial", "ev.trial"]
    assert names["fathomnet"][2] == "in.fathomnet"  # the whole name: squeue -O name:30


def test_long_error_line_keeps_its_reason(tmp_path):
    log = tmp_path / "log.err"
    reason = "refused: unexpected pickle global numpy.core.multiarray.scalar"
    log.write_text("noise\nfathompipe.checkpoint.CheckpointError: " + "x" * 2000 + reason + "\n")
    assert last_error_line(log).endswith(reason)


def test_unknown_shards_is_an_error(tmp_path):
    cfg = load_config(None, [f"data.test.annotations={ROOT / 'fathompipe/data/dataset_test.json'}",
                             f"data.test.images_dir={tmp_path}", "download.num_shards=4"])
    paths = RunPaths.of(tmp_path / "run")
    assert selected_shards("1,3", STAGES[:1], cfg, paths) == {"download": {"test/1", "test/3"}}
    with pytest.raises(SubmitError, match="no such shard 99; the shards are 0, 1, 2, 3"):
        selected_shards("1,99", STAGES[:1], cfg, paths)


def test_output_piped_into_head_ends_quietly(tmp_path):
    # the scripts are printed first, the pre-flight line after the checks: by then head has gone
    cmd = (f"{sys.executable} -m fathompipe.submit --profile jobs/local.yaml --cluster local --dry-run "
           f"--run-dir {tmp_path / 'run'} data.test.images_dir={tmp_path / 'img'} | head -1")
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("# ---- stage download") and proc.stderr == ""
