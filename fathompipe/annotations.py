"""FathomNet COCO files (train: labelled; test: `category_id` null), read once into columns and validated.

FathomNet's own tooling rejects the official test file (null category ids), so this reader accepts
both splits and instead checks what would break a later stage: ids, references, boxes, names, URLs.

A deployment's file holds ~2,000,000 ROIs (~440 MB). One Python object per annotation would take
2 GB, so the file is decoded with msgspec in chunks of typed records straight into numpy columns
(`Coco`): 2M ROIs in about 5 s and 0.8 GB, most of it the file's own bytes. Only when a check fails
is the offending section read again item by item, so every error still names the file, the field,
the id and the value. `load_coco` also opens the columnar copy a run keeps (annotation_table.py).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import msgspec
import numpy as np

NO_CATEGORY = -1  # category_id column value of an unlabelled ROI (the test split's null)
CHUNK = 65_536  # records decoded at a time: bounds the Python objects alive at once


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names file, field, id and value."""


@dataclass(frozen=True)
class Image:
    id: int
    file_name: str
    width: int
    height: int
    coco_url: str

    def local_name(self, naming: str) -> str:
        """`file_name` (FathomNet's default) or `{id}.png` (the winner's and FathomNet script's layout)."""
        return self.file_name if naming == "file_name" else f"{self.id}.png"


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    bbox: Tuple[float, float, float, float]  # COCO x, y, w, h in pixels
    category_id: Optional[int]


@dataclass(frozen=True)
class ImageTable:
    """Every image as columns, sorted by id (shards and lookups are by id)."""

    id: np.ndarray  # int64, ascending
    width: np.ndarray  # int64
    height: np.ndarray  # int64
    file_name: np.ndarray  # object (str)
    coco_url: np.ndarray  # object (str)

    def __len__(self) -> int:
        return len(self.id)

    def __iter__(self) -> Iterator[Image]:
        return (self[row] for row in range(len(self.id)))

    def __getitem__(self, row: int) -> Image:
        return Image(int(self.id[row]), str(self.file_name[row]), int(self.width[row]), int(self.height[row]),
                     str(self.coco_url[row]))

    def take(self, rows: np.ndarray | slice) -> "ImageTable":
        return ImageTable(self.id[rows], self.width[rows], self.height[rows], self.file_name[rows],
                          self.coco_url[rows])

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each image id; -1 where the id is not an image of this table."""
        ids = np.asarray(ids, np.int64)
        rows = np.searchsorted(self.id, ids).clip(0, max(len(self.id) - 1, 0))
        found = (self.id[rows] == ids) if len(self.id) else np.zeros(len(ids), bool)
        return np.where(found, rows, -1)

    def local_names(self, naming: str) -> List[str]:
        if naming == "file_name":
            return self.file_name.tolist()
        return [f"{i}.png" for i in self.id.tolist()]


@dataclass(frozen=True)
class AnnotationTable:
    """Every ROI as columns, in the file's order."""

    id: np.ndarray  # int64
    image_id: np.ndarray  # int64
    bbox: np.ndarray  # (N, 4) float64, COCO x, y, w, h in pixels
    category_id: np.ndarray  # int64, NO_CATEGORY where null

    def __len__(self) -> int:
        return len(self.id)

    def __getitem__(self, row: int) -> Annotation:
        cid = int(self.category_id[row])
        return Annotation(int(self.id[row]), int(self.image_id[row]),
                          tuple(float(v) for v in self.bbox[row]),  # type: ignore[arg-type]
                          None if cid == NO_CATEGORY else cid)

    def take(self, rows: np.ndarray | slice) -> "AnnotationTable":
        return AnnotationTable(self.id[rows], self.image_id[rows], self.bbox[rows], self.category_id[rows])


@dataclass
class Coco:
    path: Path
    images: ImageTable
    annotations: AnnotationTable
    categories: Dict[int, str]  # id -> name

    @property
    def labelled(self) -> bool:
        return bool((self.annotations.category_id != NO_CATEGORY).any())

    def class_names(self) -> List[str]:
        """Names in category-id order: index i is the model's class i (the winner's id-1 mapping)."""
        return [self.categories[i] for i in sorted(self.categories)]

    def labels(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The ground-truth name of each ROI (object array; None where unlabelled)."""
        ids = np.asarray(sorted(self.categories), np.int64)
        names = np.asarray([self.categories[i] for i in ids.tolist()] + [None], dtype=object)
        cid = self.annotations.category_id[rows]
        return names[np.where(cid == NO_CATEGORY, len(ids), np.searchsorted(ids, cid))]

    def image(self, image_id: int) -> Image:
        row = int(self.images.rows_of(np.asarray([image_id]))[0])
        if row < 0:
            raise KeyError(f"{self.path}: no image with id {image_id}")
        return self.images[row]

    def iter_annotations(self) -> Iterator[Annotation]:
        for row in range(len(self.annotations)):
            yield self.annotations[row]

    def shard_rows(self, shard: int, num_shards: int) -> np.ndarray:
        """Rows of `images` in shard `shard` of `num_shards`: images sorted by id, dealt round-robin.

        Depends only on the set of image ids, so a rerun, a resubmission or another machine computes
        the same shards; round-robin spreads FathomNet's large and small images evenly.
        """
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
        return np.arange(shard, len(self.images), num_shards)

    def shard(self, shard: int, num_shards: int) -> List[Image]:
        return [self.images[int(r)] for r in self.shard_rows(shard, num_shards)]

    def rois_of(self, image_ids: Sequence[int]) -> Dict[int, List[Annotation]]:
        """image id -> its ROIs sorted by annotation id, for the given images only."""
        wanted = np.isin(self.annotations.image_id, np.asarray(image_ids, np.int64))
        rows = np.flatnonzero(wanted)
        rows = rows[np.lexsort((self.annotations.id[rows], self.annotations.image_id[rows]))]
        out: Dict[int, List[Annotation]] = {}
        for row in rows.tolist():
            ann = self.annotations[row]
            out.setdefault(ann.image_id, []).append(ann)
        return out


def load_coco(path: str | Path) -> Coco:
    """A FathomNet COCO file, parsed and validated (AnnotationError on the first problem), or the columnar copy a
    run keeps of one (a directory written by annotation_table.write_table: read, not validated again)."""
    path = Path(path)
    if path.is_dir():
        from fathompipe.annotation_table import read_table
        return read_table(path)
    return read_coco_json(path)


# --- the lean reader: typed chunks into columns ---------------------------------------------------------------

class _Sections(msgspec.Struct):
    images: msgspec.Raw = msgspec.Raw(b"null")  # Raw fields: the sections' bytes, split into records later
    annotations: msgspec.Raw = msgspec.Raw(b"null")
    categories: msgspec.Raw = msgspec.Raw(b"null")


class _ImageRecord(msgspec.Struct, gc=False):
    id: int
    width: int
    height: int
    file_name: str
    coco_url: str


class _AnnotationRecord(msgspec.Struct, gc=False):
    id: int
    image_id: int
    bbox: Tuple[float, float, float, float]
    category_id: Optional[int] = None


class _Invalid(Exception):
    """A fast check failed: the section is checked again item by item for the exact message."""


def read_coco_json(path: Path) -> Coco:
    """Parse and validate a FathomNet COCO file; raises AnnotationError on the first problem."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file does not exist") from None
    try:
        sections = msgspec.json.decode(data, type=_Sections)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # not JSON msgspec accepts (NaN, a top level that is not an object, ...): Python's reader gives the
        # exact message; this path holds the whole file as Python objects, only ever for a broken file
        return _read_slowly(path, data)
    raws: Dict[str, List[msgspec.Raw]] = {}
    for key in ("images", "annotations", "categories"):
        try:
            raws[key] = msgspec.json.decode(getattr(sections, key), type=List[msgspec.Raw])
        except msgspec.ValidationError:
            _fail(path, key, "missing or not a list")
    del sections
    categories = _check_categories(path, [msgspec.json.decode(r) for r in raws["categories"]])
    try:
        images = _image_columns(raws["images"])
    except _Invalid:
        _check_images_slowly(path, raws["images"])
        raise AssertionError("a fast image check failed where the item checks pass") from None
    del raws["images"]
    try:
        annotations = _annotation_columns(raws["annotations"], images, categories)
    except _Invalid:
        _check_annotations_slowly(path, raws["annotations"], images, categories)
        raise AssertionError("a fast annotation check failed where the item checks pass") from None
    return Coco(path, images, annotations, categories)


def _chunks(raws: List[msgspec.Raw], decoder: msgspec.json.Decoder) -> Iterator[list]:
    for start in range(0, len(raws), CHUNK):
        try:
            yield decoder.decode(b"[" + b",".join(raws[start:start + CHUNK]) + b"]")
        except msgspec.ValidationError:
            raise _Invalid() from None


def _image_columns(raws: List[msgspec.Raw]) -> ImageTable:
    n = len(raws)
    ids, widths, heights = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    names, urls = np.empty(n, object), np.empty(n, object)
    at = 0
    for chunk in _chunks(raws, msgspec.json.Decoder(List[_ImageRecord])):
        end = at + len(chunk)
        ids[at:end] = [r.id for r in chunk]
        widths[at:end] = [r.width for r in chunk]
        heights[at:end] = [r.height for r in chunk]
        names[at:end] = [r.file_name for r in chunk]
        urls[at:end] = [r.coco_url for r in chunk]
        if not all(map(_plain_file_name, names[at:end])) or not all(map(_http_url, urls[at:end])):
            raise _Invalid()
        at = end
    order = np.argsort(ids, kind="stable")
    table = ImageTable(ids[order], widths[order], heights[order], names[order], urls[order])
    if ((table.width <= 0) | (table.height <= 0)).any() or (np.diff(table.id) == 0).any() \
            or len(set(names)) != n:
        raise _Invalid()
    return table


def _annotation_columns(raws: List[msgspec.Raw], images: ImageTable, categories: Dict[int, str]) -> AnnotationTable:
    n = len(raws)
    ids, image_ids, category_ids = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    bbox = np.empty((n, 4), np.float64)
    at = 0
    for chunk in _chunks(raws, msgspec.json.Decoder(List[_AnnotationRecord])):
        end = at + len(chunk)
        ids[at:end] = [r.id for r in chunk]
        image_ids[at:end] = [r.image_id for r in chunk]
        cats = [r.category_id for r in chunk]
        if NO_CATEGORY in cats:  # a literal -1 (no category has it) is checked as "not in 'categories'"
            raise _Invalid()
        category_ids[at:end] = [NO_CATEGORY if c is None else c for c in cats]
        bbox[at:end] = [r.bbox for r in chunk]
        at = end
    table = AnnotationTable(ids, image_ids, bbox, category_ids)
    known_categories = np.asarray(sorted(categories), np.int64)
    labelled = category_ids != NO_CATEGORY
    bad = (
        (np.diff(np.sort(ids)) == 0).any()
        or (images.rows_of(image_ids) < 0).any()
        or not np.isin(category_ids[labelled], known_categories).all()
        or not np.isfinite(bbox).all()
        or (bbox[:, 2:] <= 0).any()
    )
    if bad:
        raise _Invalid()
    return table


# --- the item checks: every message names the file, the field, the id and the value ---------------------------

def _fail(path: Path, where: str, msg: str) -> None:
    raise AnnotationError(f"{path}: {where}: {msg}")


def _int_field(path: Path, where: str, obj: Dict[str, Any], key: str) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, where, f"field {key!r} must be an integer, got {value!r}")
    return value  # type: ignore[return-value]


def _plain_file_name(name: Any) -> bool:
    """A bare file name: no directory part, nothing that could leave the images directory."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..")
            and not any(c in name for c in "/\\\x00"))


_HTTP_URL = re.compile(r"https?://[^/?#@\s]", re.I)


def _http_url(url: Any) -> bool:
    return isinstance(url, str) and _HTTP_URL.match(url) is not None


def _check_categories(path: Path, items: List[Any]) -> Dict[int, str]:
    categories: Dict[int, str] = {}
    for c in items:
        cid = _int_field(path, "categories", c, "id")
        where = f"categories[id={cid}]"
        if cid < 0:
            _fail(path, where, "category ids must not be negative")
        if cid in categories:
            _fail(path, where, "duplicate category id")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            _fail(path, where, f"field 'name' must be a non-empty string, got {name!r}")
        categories[cid] = name
    return categories


def _check_images_slowly(path: Path, items: Sequence[Any]) -> None:
    """Every image in file order; raises at the first problem."""
    seen: set[int] = set()
    names_seen: Dict[str, int] = {}
    for item in items:
        im = msgspec.json.decode(item) if isinstance(item, msgspec.Raw) else item
        iid = _int_field(path, "images", im, "id")
        where = f"images[id={iid}]"
        if iid in seen:
            _fail(path, where, "duplicate image id")
        seen.add(iid)
        width = _int_field(path, where, im, "width")
        height = _int_field(path, where, im, "height")
        if width <= 0 or height <= 0:
            _fail(path, where, f"width and height must be positive, got {width}x{height}")
        file_name = im.get("file_name")
        if not _plain_file_name(file_name):
            _fail(path, where, f"field 'file_name' must be a plain file name, got {file_name!r}")
        if file_name in names_seen:
            _fail(path, where, f"file_name {file_name!r} already used by image {names_seen[file_name]}")
        names_seen[file_name] = iid
        url = im.get("coco_url")
        if not _http_url(url):
            _fail(path, where, f"field 'coco_url' must be an http(s) URL, got {url!r}")


def _check_annotations_slowly(path: Path, items: Sequence[Any], images: ImageTable,
                              categories: Dict[int, str]) -> None:
    """Every annotation in file order; raises at the first problem."""
    seen: set[int] = set()
    known_images = set(images.id.tolist())
    for item in items:
        a = msgspec.json.decode(item) if isinstance(item, msgspec.Raw) else item
        aid = _int_field(path, "annotations", a, "id")
        where = f"annotations[id={aid}]"
        if aid in seen:
            _fail(path, where, "duplicate annotation id")
        seen.add(aid)
        image_id = _int_field(path, where, a, "image_id")
        if image_id not in known_images:
            _fail(path, where, f"image_id {image_id} is not in 'images'")
        category_id = a.get("category_id")
        if category_id is not None:
            category_id = _int_field(path, where, a, "category_id")
            if category_id not in categories:
                _fail(path, where, f"category_id {category_id} is not in 'categories'")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox
        ):
            _fail(path, where, f"field 'bbox' must be [x, y, w, h] numbers, got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):
            _fail(path, where, f"bbox has a non-finite value: {bbox!r}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            _fail(path, where, f"bbox width and height must be positive, got {bbox!r}")


def _read_slowly(path: Path, data: bytes) -> Coco:
    """Python's own JSON reader, then every item checked in order (for files msgspec refuses)."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            _fail(path, key, "missing or not a list")
    categories = _check_categories(path, raw["categories"])
    _check_images_slowly(path, raw["images"])
    images = _image_columns([msgspec.Raw(msgspec.json.encode(im)) for im in raw["images"]])
    _check_annotations_slowly(path, raw["annotations"], images, categories)
    # valid after all (msgspec refused only its form, e.g. whitespace or key order it does not mind): columns
    return Coco(path, images, _annotation_columns([msgspec.Raw(msgspec.json.encode(a)) for a in raw["annotations"]],
                                                  images, categories), categories)
