"""Pre-flight on the real Slurm (accounting enforced): a doomed run is refused before anything is queued,
naming the key and where it was set, and squeue's default output shows every job's stage and run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from conftest import PARITY
from support.fakeserver import Faults
from pipeline_helpers import cli, write_profile


def queued_for(run_dir: Path) -> List[str]:
    """squeue lines of jobs whose comment names this run directory."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %k"], capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if str(run_dir) in ln]


def assert_refused_before_queueing(tmp_path: Path, proc: subprocess.CompletedProcess, *expected: str) -> None:
    run_dir = tmp_path / "run"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "nothing was submitted" in proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "run.json").exists() and queued_for(run_dir) == []


@pytest.mark.parametrize("override, stage, key", [
    ("infer.resources.partition=gpu-rtx6000", "infer", "infer.resources.partition"),
    ("download.resources.mem_gb=100", "download", "download.resources.mem_gb"),
    ("checkpoint.resources.account=nobody", "checkpoint", "checkpoint.resources.account"),
    ("evaluate.resources.qos=inferno", "evaluate", "evaluate.resources.qos"),
    ("infer.resources.gpus_per_node=4", "infer", "infer.resources.gpus_per_node"),
])
def test_slurm_refusal_found_before_queueing(slurm, tmp_path, fake_fathomnet, parity_copy, override, stage, key):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    for args in (["--dry-run"], []):
        proc = cli("submit", "--profile", str(profile), override, *args)
        assert_refused_before_queueing(tmp_path, proc, f"stage {stage}: Slurm refuses its job",
                                       f"Change {key} on the command line ({override})")
    assert sum(server.requests.values()) == 0


BAD_ANNOTATIONS: Dict[str, Callable[[Dict], None]] = {
    "parent_file_name": lambda d: d["images"][0].update(file_name="../escape.png"),
    "absolute_file_name": lambda d: d["images"][0].update(file_name="/etc/escape.png"),
    "file_url": lambda d: d["images"][0].update(coco_url="file:///etc/passwd"),
    "duplicate_image_id": lambda d: d["images"][1].update(id=d["images"][0]["id"]),
    "duplicate_annotation_id": lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]),
    "missing_image": lambda d: d["annotations"][0].update(image_id=99999),
    "missing_category": lambda d: d["annotations"][0].update(category_id=99999),
    "negative_box": lambda d: d["annotations"][0].update(bbox=[10, 10, -5, 20]),
}
EXPECTED_WORDS = {"parent_file_name": "plain file name", "absolute_file_name": "plain file name",
                  "file_url": "http(s) URL", "duplicate_image_id": "duplicate image id",
                  "duplicate_annotation_id": "duplicate annotation id", "missing_image": "image_id 99999",
                  "missing_category": "category_id 99999", "negative_box": "must be positive"}


@pytest.mark.parametrize("case", [*BAD_ANNOTATIONS, "truncated_json", "unwritable_images_dir"])
def test_bad_annotations_refused_before_queueing(slurm, tmp_path, fake_fathomnet, parity_copy, case):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    overrides: List[str] = []
    if case == "truncated_json":
        text = ann.read_text()
        ann.write_text(text[: len(text) // 2])
        expected = ["not valid JSON"]
    elif case == "unwritable_images_dir":
        (tmp_path / "a-file").write_text("not a directory")
        overrides = [f"data.test.images_dir={tmp_path / 'a-file' / 'images'}"]
        expected = ["data.test.images_dir", "is not a directory"]
    else:
        data = json.loads(ann.read_text())
        BAD_ANNOTATIONS[case](data)
        ann.write_text(json.dumps(data))
        expected = [EXPECTED_WORDS[case]]
    proc = cli("submit", "--profile", str(profile), *overrides)
    assert_refused_before_queueing(tmp_path, proc, "data.test", *expected)
    if case != "unwritable_images_dir":
        assert str(ann) in proc.stderr
    assert sum(server.requests.values()) == 0


def test_squeue_default_output_shows_each_stage(slurm, tmp_path, fake_fathomnet, parity_copy):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "slurm")
    run_dir = tmp_path / "run"
    held = ["download.resources.extra={begin: now+1hour}", "checkpoint.resources.extra={begin: now+1hour}"]
    assert cli("submit", "--profile", str(profile), *held).returncode == 0
    try:
        ours = {ln.split()[0].split("_")[0] for ln in queued_for(run_dir)}
        assert ours, "nothing of the run is queued"
        out = subprocess.run(["squeue"], capture_output=True, text=True, check=True).stdout  # the default format
        lines = [ln.split() for ln in out.splitlines()]
        assert lines[0][:3] == ["JOBID", "PARTITION", "NAME"]
        names = {cols[2] for cols in lines[1:] if cols[0].split("_")[0] in ours}
        assert names == {"dl.run", "ck.run", "in.run", "ev.run"}, out  # stage code and run name
    finally:
        assert cli("cancel", "--run-dir", str(run_dir)).returncode == 0
