"""Parse once, shard once: the run's columnar copy of an annotation file, and what a download task reads of it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, ROOT
from fathompipe import annotations as annotations_module
from fathompipe.annotation_table import changed, read_meta, read_shard, read_table, write_table
from fathompipe.annotations import AnnotationError, load_coco


def reference_columns(path: Path):
    """The file read the plain way (Python's json), as the columns the fast reader must produce."""
    raw = json.loads(path.read_text())
    images = sorted(raw["images"], key=lambda im: im["id"])
    anns = raw["annotations"]
    return ([im["id"] for im in images], [im["file_name"] for im in images], [im["coco_url"] for im in images],
            [a["id"] for a in anns], [a["image_id"] for a in anns], [a["bbox"] for a in anns],
            [-1 if a.get("category_id") is None else a["category_id"] for a in anns])


@pytest.mark.parametrize("name", ["dataset_test.json", "train-like"])
def test_fast_reader_equals_a_plain_json_reading(tmp_path, name):
    if name == "train-like":
        from support.synthetic import train_like_coco
        path = train_like_coco(DATA / "train_annotation_labels.csv", DATA / "dataset_test.json", tmp_path / "t.json")
    else:
        path = DATA / name
    coco = load_coco(path)
    ids, names, urls, aids, image_ids, boxes, cats = reference_columns(path)
    assert coco.images.id.tolist() == ids and coco.images.file_name.tolist() == names
    assert coco.images.coco_url.tolist() == urls
    assert coco.annotations.id.tolist() == aids and coco.annotations.image_id.tolist() == image_ids
    assert coco.annotations.bbox.tolist() == boxes and coco.annotations.category_id.tolist() == cats


def test_a_problem_past_the_first_chunk_is_named_exactly(tmp_path, monkeypatch):
    """Records are decoded in chunks; a bad one deep in the file still gets the item-by-item message."""
    monkeypatch.setattr(annotations_module, "CHUNK", 50)
    raw = json.loads((DATA / "dataset_test.json").read_text())
    raw["annotations"][700]["bbox"] = [1, 2, 3, "4"]
    raw["annotations"][750]["id"] = raw["annotations"][10]["id"]  # a later problem: the first one is reported
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(AnnotationError, match=r"annotations\[id=701\]: field 'bbox' must be \[x, y, w, h\] numbers"):
        load_coco(path)


@pytest.mark.parametrize("mutate, words", [
    (lambda r: r["annotations"][3].update(category_id=-1), ["annotations[id=4]", "category_id -1 is not in"]),
    (lambda r: r["categories"].append({"id": -1, "name": "x"}), ["categories[id=-1]", "negative"]),
    (lambda r: r["annotations"][3].update(id=True), ["annotations", "'id' must be an integer, got True"]),
    (lambda r: r.update(images={}), ["images", "missing or not a list"]),
    (lambda r: r["images"][5].update(file_name="a/"), ["images[id=6]", "plain file name", "'a/'"]),
])
def test_more_problems_name_field_id_and_value(tmp_path, mutate, words):
    raw = json.loads((DATA / "dataset_test.json").read_text())
    mutate(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(AnnotationError) as exc:
        load_coco(path)
    assert all(w in str(exc.value) for w in words), str(exc.value)


def test_table_round_trip_and_shards(tmp_path):
    coco = load_coco(DATA / "dataset_test.json")
    table = tmp_path / "annotations" / "test"
    write_table(coco, table, num_shards=7)
    meta = read_meta(table)
    assert meta["num_shards"] == 7 and meta["images"] == 325 and meta["annotations"] == 788
    again = read_table(table)
    assert again.path == coco.path and again.categories == coco.categories
    for column in ("id", "width", "height", "file_name", "coco_url"):
        assert getattr(again.images, column).tolist() == getattr(coco.images, column).tolist()
    for column in ("id", "image_id", "bbox", "category_id"):
        assert np.array_equal(getattr(again.annotations, column), getattr(coco.annotations, column))
    for shard in range(7):  # one row group each, the same images the file would give
        assert read_shard(table, shard, 7) == coco.shard(shard, 7)
    assert read_shard(table, 2, 5) == coco.shard(2, 5)  # another shard count: read whole, dealt the same way
    assert [p.name for p in table.parent.iterdir()] == ["test"]  # published by one rename, no staging left


def test_changed_notices_a_new_content_not_a_new_mtime(tmp_path):
    src = tmp_path / "a.json"
    src.write_bytes((DATA / "dataset_test.json").read_bytes())
    table = tmp_path / "t"
    write_table(load_coco(src), table, 2)
    assert changed(table, src) is None
    src.touch()  # same bytes, new mtime: still the same file
    assert changed(table, src) is None
    raw = json.loads(src.read_text())
    raw["images"].pop()
    src.write_text(json.dumps(raw))
    assert "is not the file this run's shards were cut from" in changed(table, src)


def _task_peak_rss(table: Path, shard: int, num_shards: int, images_dir: Path) -> int:
    """Peak RSS (bytes) of a download task process on one shard of a table (one download process): the kernel's
    VmHWM, which starts afresh at exec (getrusage's maxrss would include this test process's own peak)."""
    code = ("import re, sys; from fathompipe.download import main; "
            f"rc = main(['--annotations', {str(table)!r}, '--images-dir', {str(images_dir)!r}, '--shard', '{shard}', "
            f"'--num-shards', '{num_shards}', '--processes', '1', '--no-progress']); "
            "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "complete: 10/10 ok" in proc.stdout
    return int(proc.stdout.strip().splitlines()[-1])


def test_a_download_tasks_memory_does_not_grow_with_the_file(tmp_path):
    """The same 10-image shard out of a 5,000-ROI and a 100,000-ROI file (20x the annotations): the task reads only
    its row group, so its peak memory is the same. Reading the whole file (the old way) adds ~100 MB here."""
    from support.fakeserver import FakeFathomNet, ServerThread
    from support.synthetic import production_like_coco, synthetic_png

    served = tmp_path / "served"
    served.mkdir()
    peaks = []
    with ServerThread(FakeFathomNet(served)) as server:
        for n_rois, num_shards in ((5_000, 100), (100_000, 2_000)):  # 1,000 and 20,000 images: 10 per shard
            coco = load_coco(production_like_coco(tmp_path / f"{n_rois}.json", n_rois, base_url=server.base_url))
            table = tmp_path / f"table-{n_rois}"
            write_table(coco, table, num_shards)
            for image in coco.shard(3, num_shards):
                (served / image.file_name).write_bytes(synthetic_png(image.width, image.height, image.id))
            peaks.append(_task_peak_rss(table, 3, num_shards, tmp_path / f"images-{n_rois}"))
    small, large = peaks
    assert large - small < 15e6, f"peak RSS {small / 1e6:.0f} MB -> {large / 1e6:.0f} MB"
