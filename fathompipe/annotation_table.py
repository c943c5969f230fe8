"""A split's annotation file, parsed once when the run is submitted and kept as columns for every task.

    RUN/annotations/<split>/images.arrow       one record batch per download shard: shard k's images, by id
    RUN/annotations/<split>/annotations.arrow  every ROI in the file's order: id, image_id, x, y, w, h, category_id
    RUN/annotations/<split>/table.json         categories, the source file's fingerprint, counts: written last

Arrow IPC files, uncompressed and memory-mapped when read: a download task of a 2M-ROI split reads one
record batch (its ~400 images; the file's footer is a few bytes per batch, where a parquet footer with
per-group statistics would grow with the shard count) instead of parsing 440 MB, and the inference and
evaluate tasks read only the columns they need. The directory is published with one rename,
so a task sees a whole table or none. A run's shards are cut from the file as it was at its first submit:
`changed` tells a later submit that the file has changed since.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from fathompipe import atomic
from fathompipe.annotations import AnnotationError, AnnotationTable, Coco, Image, ImageTable

META = "table.json"
IMAGES = "images.arrow"
ANNOTATIONS = "annotations.arrow"
VERSION = 1


def fingerprint(path: Path) -> Dict[str, object]:
    """What identifies the annotation file's content: size, mtime and sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}


def read_meta(directory: Path) -> Optional[Dict[str, object]]:
    """The table's metadata; None when there is no complete table there."""
    try:
        return json.loads((directory / META).read_text())
    except FileNotFoundError:
        return None


def changed(directory: Path, source: Path) -> Optional[str]:
    """None when the table in `directory` was cut from `source` as it is now, else why not (the hash is
    computed only when size or mtime differ from the recorded ones)."""
    meta = read_meta(directory)
    assert meta is not None
    recorded = meta["source"]
    assert isinstance(recorded, dict)
    try:
        st = source.stat()
    except FileNotFoundError:
        return f"{source} does not exist"
    if (str(source), st.st_size, st.st_mtime_ns) == (recorded["path"], recorded["size"], recorded["mtime_ns"]):
        return None
    now = fingerprint(source)
    if now["sha256"] == recorded["sha256"]:
        return None
    return (f"{source} is not the file this run's shards were cut from ({recorded['path']}, sha256 "
            f"{str(recorded['sha256'])[:12]}, {recorded['size']:,} bytes; now sha256 {str(now['sha256'])[:12]}, "
            f"{now['size']:,} bytes)")


def write_table(coco: Coco, directory: Path, num_shards: int) -> None:
    """Write the table of `coco` (parsed from `coco.path`) into `directory` (replacing one there), published with
    one rename."""
    with atomic.atomic_dir(directory, replace=True) as staging:
        im = coco.images
        with ipc.new_file(staging / IMAGES, _IMAGE_SCHEMA) as writer:
            for shard in range(num_shards):
                writer.write_batch(_image_batch(im.take(coco.shard_rows(shard, num_shards))))
        an = coco.annotations
        with ipc.new_file(staging / ANNOTATIONS, _ANNOTATION_SCHEMA) as writer:
            for start in range(0, max(len(an), 1), 1 << 20):
                writer.write_batch(_annotation_batch(an.take(slice(start, start + (1 << 20)))))
        meta = {"version": VERSION, "source": fingerprint(coco.path), "num_shards": num_shards,
                "images": len(im), "annotations": len(an),
                "categories": [[cid, name] for cid, name in sorted(coco.categories.items())]}
        atomic.write_json(staging / META, meta)


def read_table(directory: Path) -> Coco:
    """The whole table as a Coco (images sorted by id, ROIs in the file's order)."""
    meta = _meta_or_fail(directory)
    images = _image_table(_open(directory / IMAGES).read_all())
    order = np.argsort(images.id, kind="stable")
    t = _open(directory / ANNOTATIONS).read_all()  # from the mapped file into numpy columns: 56 bytes a ROI
    annotations = AnnotationTable(t["id"].to_numpy(), t["image_id"].to_numpy(),
                                  np.stack([t[c].to_numpy() for c in ("x", "y", "w", "h")], axis=1),
                                  t["category_id"].to_numpy())
    categories = {int(cid): str(name) for cid, name in meta["categories"]}  # type: ignore[union-attr]
    return Coco(Path(str(meta["source"]["path"])), images.take(order), annotations, categories)  # type: ignore


def read_shard(path: str | Path, shard: int, num_shards: int) -> List[Image]:
    """Shard `shard` of `num_shards` of the images: one record batch when `path` is a table written for that many
    shards, else the whole table or COCO file read and dealt (the same images either way)."""
    path = Path(path)
    meta = read_meta(path) if path.is_dir() else None
    if meta is not None and meta["num_shards"] == num_shards:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
        images = _image_table(_open(path / IMAGES).get_batch(shard))
        return [images[i] for i in range(len(images))]
    from fathompipe.annotations import load_coco
    return load_coco(path).shard(shard, num_shards)


def _open(path: Path) -> ipc.RecordBatchFileReader:
    return ipc.open_file(pa.memory_map(str(path)))


def _meta_or_fail(directory: Path) -> Dict[str, object]:
    meta = read_meta(directory)
    if meta is None:
        raise AnnotationError(f"{directory}: no annotation table here ({META} is missing): the submit command "
                              f"writes it from the split's annotation file before any job starts")
    if meta.get("version") != VERSION:
        raise AnnotationError(f"{directory}: annotation table version {meta.get('version')}, this fathompipe reads "
                              f"version {VERSION}: submit into a new --run-dir")
    return meta


_IMAGE_SCHEMA = pa.schema([("id", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
                           ("file_name", pa.string()), ("coco_url", pa.string())])
_ANNOTATION_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.int64()), ("x", pa.float64()),
                                ("y", pa.float64()), ("w", pa.float64()), ("h", pa.float64()),
                                ("category_id", pa.int64())])


def _image_batch(im: ImageTable) -> pa.RecordBatch:
    return pa.record_batch([pa.array(im.id, pa.int64()), pa.array(im.width, pa.int64()),
                            pa.array(im.height, pa.int64()), pa.array(im.file_name.tolist(), pa.string()),
                            pa.array(im.coco_url.tolist(), pa.string())], schema=_IMAGE_SCHEMA)


def _annotation_batch(an: AnnotationTable) -> pa.RecordBatch:
    return pa.record_batch([pa.array(an.id, pa.int64()), pa.array(an.image_id, pa.int64())]
                           + [pa.array(np.ascontiguousarray(an.bbox[:, k]), pa.float64()) for k in range(4)]
                           + [pa.array(an.category_id, pa.int64())], schema=_ANNOTATION_SCHEMA)


def _image_table(t: pa.Table | pa.RecordBatch) -> ImageTable:
    return ImageTable(t["id"].to_numpy(), t["width"].to_numpy(), t["height"].to_numpy(),
                      np.asarray(t["file_name"].to_pylist(), dtype=object),
                      np.asarray(t["coco_url"].to_pylist(), dtype=object))
