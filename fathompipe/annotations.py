"""FathomNet COCO files (train: labelled; test: `category_id` null), read and validated.

FathomNet's own tooling rejects the official test file (null category ids), so this reader accepts
both splits and instead checks what would break a later stage: ids, references, boxes, names, URLs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse


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
    bbox: tuple[float, float, float, float]  # COCO x, y, w, h in pixels
    category_id: Optional[int]


@dataclass
class CocoDataset:
    path: Path
    images: Dict[int, Image]
    annotations: List[Annotation]
    categories: Dict[int, str]  # id -> name

    @property
    def labelled(self) -> bool:
        return any(a.category_id is not None for a in self.annotations)

    def class_names(self) -> List[str]:
        """Names in category-id order: index i is the model's class i (the winner's id-1 mapping)."""
        return [self.categories[i] for i in sorted(self.categories)]


def _fail(path: Path, where: str, msg: str) -> None:
    raise AnnotationError(f"{path}: {where}: {msg}")


def _int_field(path: Path, where: str, obj: Dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, where, f"field {key!r} must be an integer, got {value!r}")
    return value


def _plain_file_name(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    pure = PurePosixPath(name)
    return not pure.is_absolute() and len(pure.parts) == 1 and name not in (".", "..")


def load_coco(path: str | Path) -> CocoDataset:
    """Parse and validate a FathomNet COCO file; raises AnnotationError on the first problem."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            _fail(path, key, "missing or not a list")

    categories: Dict[int, str] = {}
    for c in raw["categories"]:
        cid = _int_field(path, "categories", c, "id")
        where = f"categories[id={cid}]"
        if cid in categories:
            _fail(path, where, "duplicate category id")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            _fail(path, where, f"field 'name' must be a non-empty string, got {name!r}")
        categories[cid] = name

    images: Dict[int, Image] = {}
    names_seen: Dict[str, int] = {}
    for im in raw["images"]:
        iid = _int_field(path, "images", im, "id")
        where = f"images[id={iid}]"
        if iid in images:
            _fail(path, where, "duplicate image id")
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
        parsed = urlparse(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            _fail(path, where, f"field 'coco_url' must be an http(s) URL, got {url!r}")
        images[iid] = Image(iid, file_name, width, height, url)

    annotations: List[Annotation] = []
    ann_ids: set[int] = set()
    for a in raw["annotations"]:
        aid = _int_field(path, "annotations", a, "id")
        where = f"annotations[id={aid}]"
        if aid in ann_ids:
            _fail(path, where, "duplicate annotation id")
        ann_ids.add(aid)
        image_id = _int_field(path, where, a, "image_id")
        if image_id not in images:
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
        annotations.append(Annotation(aid, image_id, tuple(float(v) for v in bbox), category_id))  # type: ignore[arg-type]
    return CocoDataset(path, images, annotations, categories)


def shard_images(dataset: CocoDataset, shard: int, num_shards: int) -> List[Image]:
    """Shard `shard` of `num_shards`: images sorted by id, dealt round-robin.

    Depends only on the set of image ids, so a rerun, a resubmission or another machine computes
    the same shards; round-robin spreads FathomNet's large and small images evenly.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    ids = sorted(dataset.images)
    return [dataset.images[i] for i in ids[shard::num_shards]]
