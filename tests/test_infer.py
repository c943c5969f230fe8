"""The inference stage: parity with the winner's logits, batching, missing images, resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import pyarrow.parquet as pq
import pytest
import torch

from conftest import PARITY, ROOT
from fathompipe.model.weights import load_model
from fathompipe.config import InferConfig, SplitSource
from fathompipe.jobs import InferJob
from fathompipe.infer import run, slim_files
from fathompipe.part_options import PartOptionsMismatch
from fathompipe.layout import OutputFiles
from fathompipe.embeddings import load_embeddings

PILLOW13 = int(PIL.__version__.split(".")[0]) >= 13
EXPECTED_LOGITS = np.load(PARITY / ("expected_logits_pillow13.npy" if PILLOW13 else "expected_logits.npy"))
EXPECTED_CSV = (PARITY / ("expected_submission_pillow13.csv" if PILLOW13 else "expected_submission.csv")).read_text()
ENCODER = str(PARITY / "tiny_dinov2_config.json")
ANN_IDS = [a["id"] for a in json.loads((PARITY / "dataset.json").read_text())["annotations"]]


def logits_by_annotation(parquet: Path) -> np.ndarray:
    table = pq.read_table(parquet).to_pandas().set_index("annotation_id")
    return np.stack(table.loc[ANN_IDS]["logits"].to_numpy())


def infer(parity_copy: Path, out: Path, images: Path = PARITY / "images", **kw) -> dict:
    options = InferConfig(device="cpu", precision="fp32", encoder_config=ENCODER, **{"num_workers": 0, "batch_size": 2,
                                                                                      **kw})
    return run(InferJob(SplitSource(str(PARITY / "dataset.json"), str(images)), str(parity_copy), str(out), options),
               progress=False)


def test_fp32_cpu_matches_the_winners_logits(parity_copy, tmp_path):
    out = tmp_path / "pred.csv"
    assert infer(parity_copy, out) == {"predicted": 30, "skipped": 0, "embedded": 30}
    logits = logits_by_annotation(out.with_suffix(".parquet"))
    assert np.abs(logits - EXPECTED_LOGITS).max() < 1e-4
    assert (logits.argmax(1) == EXPECTED_LOGITS.argmax(1)).all()
    assert out.read_text() == EXPECTED_CSV
    table = pq.read_table(out.with_suffix(".parquet")).to_pandas()
    assert list(table.columns) == ["annotation_id", "image_id", "split", "concept_name", "confidence",
                                   "top5_names", "top5_scores", "logits", "label", "note"]
    row = table.iloc[0]
    assert row.top5_names[0] == row.concept_name and abs(row.top5_scores[0] - row.confidence) < 1e-7
    assert len(row.logits) == 79 and table.annotation_id.is_monotonic_increasing


def test_embeddings_are_the_classifier_heads_input(parity_copy, tmp_path):
    """One row per predicted ROI, keyed by annotation id; the head applied to them gives the logits back."""
    out = tmp_path / "pred.csv"
    infer(parity_copy, out, batch_size=7)
    ids, emb = load_embeddings(OutputFiles(out).embeddings)
    emb = np.asarray(emb)  # read on demand; all of it here
    table = pq.read_table(out.with_suffix(".parquet")).to_pandas()
    assert ids.tolist() == table.annotation_id.tolist() and emb.dtype == np.float32
    model, spec = load_model(slim_files(parity_copy, ENCODER))
    assert emb.shape == (30, spec.hidden_size) and np.isfinite(emb).all() and emb.std(axis=0).min() > 0
    with torch.inference_mode():
        head = model.eval().classifier(torch.from_numpy(np.array(emb))).numpy()
    assert np.abs(head - np.stack(table.logits.to_numpy())).max() < 1e-5
    by_id = dict(zip(ids.tolist(), head))
    assert np.abs(np.stack([by_id[a] for a in ANN_IDS]) - EXPECTED_LOGITS).max() < 1e-4  # the winner's logits


def test_embeddings_off_writes_none_and_the_same_predictions(parity_copy, tmp_path):
    """infer.embeddings=false (e.g. for the train split, where the file is large): no embeddings file, none kept in
    the parts, a stale file from an earlier run removed, and predictions equal to a run with embeddings."""
    out = tmp_path / "pred.csv"
    OutputFiles(out).embeddings.write_bytes(b"stale")
    assert infer(parity_copy, out, batch_size=7, embeddings=False) == {"predicted": 30, "skipped": 0, "embedded": 0}
    assert not OutputFiles(out).embeddings.exists()
    assert all("embeddings" not in np.load(part).files for part in OutputFiles(out).parts.glob("*.npz"))
    assert out.read_text() == EXPECTED_CSV
    assert np.abs(logits_by_annotation(out.with_suffix(".parquet")) - EXPECTED_LOGITS).max() < 1e-4


@pytest.mark.parametrize("batch_size, workers", [(1, 0), (7, 2), (64, 1)])
def test_any_batch_size_gives_the_same_result(parity_copy, tmp_path, batch_size, workers):
    out = tmp_path / "pred.csv"
    infer(parity_copy, out, batch_size=batch_size, num_workers=workers)
    assert out.read_text() == EXPECTED_CSV
    assert np.abs(logits_by_annotation(out.with_suffix(".parquet")) - EXPECTED_LOGITS).max() < 1e-4


def test_resize_on_the_device_gives_the_same_predictions(parity_copy, tmp_path):
    """infer.resize=device: DataLoader workers (2 processes) only decode and hand over one pixel buffer a batch;
    the crops are cut and resized by fathompipe.model.resize (here on the CPU). The model sees the same bytes as
    on the cpu path, so the logits equal that path's exactly, the winner's within the usual tolerance."""
    cpu, device = tmp_path / "cpu" / "pred.csv", tmp_path / "device" / "pred.csv"
    infer(parity_copy, cpu, batch_size=7)
    assert infer(parity_copy, device, batch_size=7, num_workers=2, resize="device") == {
        "predicted": 30, "skipped": 0, "embedded": 30}
    logits = logits_by_annotation(device.with_suffix(".parquet"))
    assert np.array_equal(logits, logits_by_annotation(cpu.with_suffix(".parquet")))
    assert np.abs(logits - EXPECTED_LOGITS).max() < 1e-4
    assert (logits.argmax(1) == EXPECTED_LOGITS.argmax(1)).all()
    assert device.read_text() == EXPECTED_CSV
    a, b = (pq.read_table(p.with_suffix(".parquet")).to_pandas() for p in (cpu, device))
    assert a.note.tolist() == b.note.tolist()


def test_a_rerun_with_other_options_is_refused_not_mixed(parity_copy, tmp_path, run_cli):
    """Part files record the options that change results (OUT.parts/options.json): rerunning into the same output
    with another precision or batch size stops with one clear line instead of mixing batches; the same options
    (or another resize path, which gives identical crops) continue."""
    out = tmp_path / "pred.csv"
    infer(parity_copy, out, batch_size=7)
    with pytest.raises(PartOptionsMismatch, match=r"infer.batch_size=7, and this run asks for 5.*--batch-size"):
        infer(parity_copy, out, batch_size=5)
    proc = run_cli("fathompipe.infer", "--checkpoint", str(parity_copy), "--annotations", str(PARITY / "dataset.json"),
                   "--images-dir", str(PARITY / "images"), "--output", str(out), "--device", "cpu", "--precision",
                   "bf16", "--batch-size", "7", "--num-workers", "0", "--encoder-config", ENCODER)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "infer.precision=fp32, and this run asks for bf16" in proc.stderr and f"delete {out.with_suffix('')}" \
        in proc.stderr.replace(".parts", "")
    assert infer(parity_copy, out, batch_size=7, resize="device")["predicted"] == 30
    assert out.read_text() == EXPECTED_CSV


def test_no_embeddings_after_a_run_with_them_writes_none(parity_copy, tmp_path):
    """--no-embeddings into an output whose parts hold embeddings: no embeddings file (they were merged before);
    asking for embeddings again after that is refused, since parts from then on may have none."""
    out = tmp_path / "pred.csv"
    infer(parity_copy, out, batch_size=7)
    assert OutputFiles(out).embeddings.exists()
    assert infer(parity_copy, out, batch_size=7, embeddings=False) == {"predicted": 30, "skipped": 0, "embedded": 0}
    assert not OutputFiles(out).embeddings.exists() and out.read_text() == EXPECTED_CSV
    with pytest.raises(PartOptionsMismatch, match="infer.embeddings=false, and this run asks for true"):
        infer(parity_copy, out, batch_size=7)


def test_a_finished_stage_is_not_merged_again_until_a_shard_is_redone(parity_copy, tmp_path):
    """A rerun of a finished shard (or a second shard ending while the first merges) leaves the outputs as they are;
    a shard done again afterwards (its marker newer than OUT.csv) merges anew."""
    out = tmp_path / "pred.csv"
    files = OutputFiles(out)
    first = infer(parity_copy, out, batch_size=7)
    stamps = {p: p.stat().st_mtime_ns for p in (out, files.parquet, files.embeddings, files.skipped)}
    assert infer(parity_copy, out, batch_size=7) == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    marker = files.shard_marker(0, 1)
    later = stamps[out] + 10**9
    os.utime(marker, ns=(later, later))
    assert infer(parity_copy, out, batch_size=7) == first
    assert out.stat().st_mtime_ns > stamps[out] and out.read_text() == EXPECTED_CSV


def test_missing_and_unreadable_images_are_skipped_and_listed(parity_copy, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(PARITY / "images", images)
    data = json.loads((PARITY / "dataset.json").read_text())
    gone, broken = data["images"][0], data["images"][3]
    (images / gone["file_name"]).unlink()
    (images / broken["file_name"]).write_bytes(b"not an image")
    out = tmp_path / "pred.csv"
    result = infer(parity_copy, out, images=images)
    lost = {a["id"] for a in data["annotations"] if a["image_id"] in (gone["id"], broken["id"])}
    assert result == {"predicted": 30 - len(lost), "skipped": len(lost), "embedded": 30 - len(lost)}
    assert not set(load_embeddings(OutputFiles(out).embeddings)[0].tolist()) & lost
    skipped = OutputFiles(out).skipped.read_text().splitlines()
    assert skipped[0] == "annotation_id,image_id,reason" and len(skipped) == 1 + len(lost)
    assert any("image missing" in s for s in skipped) and any("image unreadable" in s for s in skipped)
    expected = dict(line.split(",", 1) for line in EXPECTED_CSV.splitlines()[1:])
    for line in out.read_text().splitlines()[1:]:
        ann_id, name = line.split(",", 1)
        assert int(ann_id) not in lost and expected[ann_id] == name


def test_resume_after_interruption_equals_one_uninterrupted_run(parity_copy, tmp_path):
    whole = tmp_path / "whole" / "pred.csv"
    infer(parity_copy, whole, batch_size=1)
    out = tmp_path / "resumed" / "pred.csv"
    cmd = [sys.executable, "-m", "fathompipe.infer", "--checkpoint", str(parity_copy), "--annotations",
           str(PARITY / "dataset.json"), "--images-dir", str(PARITY / "images"), "--output", str(out),
           "--device", "cpu", "--precision", "fp32", "--batch-size", "1", "--num-workers", "0",
           "--encoder-config", ENCODER]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = OutputFiles(out).parts
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(parts.glob("*.npz"))) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # as hard as a node failure: nothing gets to clean up
    proc.wait(30)
    done_before = {p: p.stat().st_mtime_ns for p in parts.glob("*.npz")}
    assert 6 <= len(done_before) < 30 and not out.exists()
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} already done" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before  # finished batches not redone
    assert out.read_text() == whole.read_text()
    assert np.array_equal(logits_by_annotation(out.with_suffix(".parquet")),
                          logits_by_annotation(whole.with_suffix(".parquet")))
    for a, b in zip(load_embeddings(OutputFiles(out).embeddings), load_embeddings(OutputFiles(whole).embeddings)):
        assert np.array_equal(a, b)


def test_cli_errors_are_one_line(parity_copy, tmp_path, run_cli):
    proc = run_cli("fathompipe.infer", "--checkpoint", str(tmp_path / "nope.ckpt"), "--annotations",
                   str(PARITY / "dataset.json"), "--images-dir", str(PARITY / "images"), "--output",
                   str(tmp_path / "p.csv"), "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "nope.ckpt does not exist: run the checkpoint stage first" in proc.stderr
