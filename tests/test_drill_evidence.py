"""The drill table's measures count what they claim: a file sent twice, a part file rewritten, a
corrupt image and a changed prediction each show up (real HTTP on loopback, real part files)."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import requests

from conftest import PARITY
from drill_evidence import data_lost, images_redone, parts_dir, rois_redone, snapshot
from support.fakeserver import FakeFathomNet, ServerThread
from pipeline_helpers import EXPECTED_SUBMISSION

ANNOTATIONS = json.loads((PARITY / "dataset.json").read_text())


def fetch(base_url: str, name: str, images) -> None:
    (images / name).write_bytes(requests.get(base_url + name, timeout=30).content)


def test_each_measure_sees_what_it_counts(tmp_path):
    images, run_dir = tmp_path / "images", tmp_path / "run"
    images.mkdir()
    parts = parts_dir(run_dir)
    parts.mkdir(parents=True)
    for i in range(2):
        np.savez(parts / f"shard0-batch{i}.npz", annotation_id=np.arange(3) + 3 * i, skipped=np.asarray([], str))
    names = [im["file_name"] for im in ANNOTATIONS["images"]]
    server = FakeFathomNet(PARITY / "images")
    with ServerThread(server) as thread:
        fetch(thread.base_url, names[0], images)
        before = snapshot(server, images, run_dir)
        assert images_redone(server, before) == 0 and rois_redone(before, run_dir) == 0
        fetch(thread.base_url, names[0], images)  # on disk already: fetched again
        fetch(thread.base_url, names[1], images)  # new: fetched once
        assert images_redone(server, before) == 1
        time.sleep(0.01)
        np.savez(parts / "shard0-batch1.npz", annotation_id=np.arange(3, 6), skipped=np.asarray([], str))
        assert rois_redone(before, run_dir) == 3
        (parts / "shard0-batch0.npz").unlink()
        assert rois_redone(before, run_dir) == 6

    for name in names[2:]:
        shutil.copyfile(PARITY / "images" / name, images / name)
    final = tmp_path / "predictions.csv"
    shutil.copyfile(EXPECTED_SUBMISSION, final)
    assert data_lost(ANNOTATIONS, images, PARITY / "images", final, EXPECTED_SUBMISSION) == 0
    (images / names[3]).write_bytes((images / names[3]).read_bytes()[:-10])  # a truncated image
    assert data_lost(ANNOTATIONS, images, PARITY / "images", final, EXPECTED_SUBMISSION) == 1
    (images / names[4]).unlink()  # a missing one
    rows = final.read_text().splitlines()
    final.write_text("\n".join(rows[:-1]) + "\n")  # a lost prediction
    assert data_lost(ANNOTATIONS, images, PARITY / "images", final, EXPECTED_SUBMISSION) == 3
    header, first, *rest = rows
    ann_id, name = first.split(",")
    other = next(r.split(",")[1] for r in rest if r.split(",")[1] != name)
    final.write_text("\n".join([header, f"{ann_id},{other}", *rest]) + "\n")  # a changed prediction
    assert data_lost(ANNOTATIONS, images, PARITY / "images", final, EXPECTED_SUBMISSION) == 3
