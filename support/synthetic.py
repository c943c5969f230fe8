"""Synthetic stand-ins for FathomNet images: real sizes and ids, made-up pixels.

The tests, the download benchmark and the offline demo need image servers and files without
FathomNet; these images have the dimensions the annotation files declare, so verification applies.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict

import numpy as np
from PIL import Image


def synthetic_png(width: int, height: int, seed: int, noise: float = 0.0) -> bytes:
    """A PNG of coarse random blocks; `noise` (0..1) adds per-pixel noise for realistic file sizes."""
    import io

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((width, height), Image.NEAREST)
    if noise:
        arr = np.asarray(im).astype(np.int16)
        arr += (rng.standard_normal(arr.shape) * 40 * noise).astype(np.int16)
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def serve_dataset(annotations: str | Path, out_json: str | Path, serve_dir: str | Path, base_url: str,
                  limit: int | None = None, noise: float = 0.0, source_dir: str | Path | None = None) -> Dict[str, Any]:
    """Put an image per image of `annotations` into `serve_dir` (copied from `source_dir` when it has
    one, else synthetic), and write a copy of the annotation file whose `coco_url`s point at
    `base_url` (a FakeFathomNet)."""
    raw = json.loads(Path(annotations).read_text())
    if limit is not None:
        keep = {im["id"] for im in raw["images"][:limit]}
        raw["images"] = [im for im in raw["images"] if im["id"] in keep]
        raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] in keep]
    serve_dir = Path(serve_dir)
    serve_dir.mkdir(parents=True, exist_ok=True)
    for im in raw["images"]:
        target = serve_dir / im["file_name"]
        source = Path(source_dir) / im["file_name"] if source_dir else None
        if source is not None and source.exists():
            shutil.copyfile(source, target)
        elif not target.exists():
            target.write_bytes(synthetic_png(im["width"], im["height"], im["id"], noise))
        im["coco_url"] = base_url + im["file_name"]
    Path(out_json).write_text(json.dumps(raw))
    return raw


def train_like_coco(labels_csv: str | Path, categories_from: str | Path, out_json: str | Path,
                    seed: int = 0) -> Path:
    """A labelled COCO file with the real train split's ids and labels (from
    train_annotation_labels.csv) and synthetic 1920x1080 images and boxes (the real boxes are not
    public here): a realistic train-sized input for tests and benchmarks."""
    import csv

    rng = np.random.default_rng(seed)
    categories = json.loads(Path(categories_from).read_text())["categories"]
    images: Dict[int, Dict[str, Any]] = {}
    annotations = []
    with open(labels_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            image_id = int(row["image_id"])
            if image_id not in images:
                images[image_id] = {"id": image_id, "width": 1920, "height": 1080,
                                    "file_name": f"train-{image_id:05d}.png",
                                    "coco_url": f"https://fathomnet.invalid/train-{image_id:05d}.png"}
            side = float(np.clip(rng.lognormal(np.log(61), 0.91), 4, 1000))
            w, h = round(side, 1), round(side * float(np.exp(rng.normal(0, 0.3))), 1)
            x, y = float(rng.uniform(0, 1920 - w)), float(rng.uniform(0, max(1.0, 1080 - h)))
            annotations.append({"id": int(row["annotation_id"]), "image_id": image_id,
                                "category_id": int(row["category_id"]), "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0, "segmentation": []})
    out = Path(out_json)
    out.write_text(json.dumps({"images": list(images.values()), "annotations": annotations,
                               "categories": categories}))
    return out


PRODUCTION_URL = "https://database.fathomnet.invalid/static/m3/framegrabs/images/"  # FathomNet's URL length


def production_like_coco(out_json: str | Path, n_rois: int, rois_per_image: int = 5, seed: int = 0,
                         labelled: bool = True, base_url: str = PRODUCTION_URL) -> Path:
    """A FathomNet-shaped COCO file of any size (MBARI's deployments: ~2,000,000 ROIs on ~400,000 images), with
    every field FathomNet writes (uuid file names, URLs, license, area, segmentation), written in chunks so that
    making it takes little memory. Boxes as in `train_like_coco`; labels uniform over the 79 categories."""
    import uuid

    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(_category_names())]
    n_images = max(1, -(-n_rois // rois_per_image))
    out = Path(out_json)
    with open(out, "w") as fh:
        fh.write('{"info": {"description": "synthetic, production-like"}, "licenses": [], "images": [')
        for start in range(0, n_images, 50_000):
            ids = range(start + 1, min(n_images, start + 50_000) + 1)
            names = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) + ".png" for _ in ids]
            chunk = [{"id": i, "width": 1920, "height": 1080, "file_name": n, "license": 0,
                      "flickr_url": base_url + n, "coco_url": base_url + n, "date_captured": None}
                     for i, n in zip(ids, names)]
            fh.write(("," if start else "") + json.dumps(chunk)[1:-1])
        fh.write('], "annotations": [')
        for start in range(0, n_rois, 100_000):
            k = min(n_rois, start + 100_000) - start
            side = np.clip(rng.lognormal(np.log(61), 0.91, k), 4, 1000).round(1)
            h = (side * np.exp(rng.normal(0, 0.3, k))).clip(1, 1080).round(1)
            x = rng.uniform(0, 1920 - side).round(1)
            y = rng.uniform(0, np.maximum(1.0, 1080 - h)).round(1)
            cat = rng.integers(1, len(categories) + 1, k)
            chunk = [{"id": start + j + 1, "image_id": (start + j) // rois_per_image + 1,
                      "category_id": int(cat[j]) if labelled else None, "segmentation": [],
                      "area": round(float(side[j] * h[j]), 2), "bbox": [float(x[j]), float(y[j]), float(side[j]),
                                                                         float(h[j])], "iscrowd": 0}
                     for j in range(k)]
            fh.write(("," if start else "") + json.dumps(chunk)[1:-1])
        fh.write('], "categories": ' + json.dumps(categories) + "}")
    return out


def _category_names() -> list:
    """The 79 FathomNet 2025 category names, from the taxonomy shipped with the package."""
    import csv
    from importlib.resources import files

    with files("fathompipe").joinpath("data/taxonomy.csv").open() as fh:
        return [row["name"] for row in csv.DictReader(fh)]


def model_like_logits(coco_json: str | Path, seed: int = 0, right: float = 0.85):
    """(annotation ids, logits (N, 79) float32 in category-id order) for a labelled COCO file: the target class is
    the truth with probability `right`, else one of its four taxonomic neighbours (relatives), raised above Gaussian
    noise by a margin from barely to very confident. Confusions between relatives and hesitant softmaxes, as a
    trained classifier has them; no claim on calibration."""
    from fathompipe.evaluation.taxonomy import taxonomic_order

    data = json.loads(Path(coco_json).read_text())
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    position = {n: i for i, n in enumerate(taxonomic_order())}
    by_position = {i: names.index(n) for n, i in position.items()}
    by_id = {c["id"]: c["name"] for c in data["categories"]}
    rng = np.random.default_rng(seed)
    n = len(data["annotations"])
    truth = np.array([position[by_id[a["category_id"]]] for a in data["annotations"]])
    shift = np.where(rng.random(n) < right, 0, rng.choice([-2, -1, 1, 2], n))
    target = np.array([by_position[p] for p in np.clip(truth + shift, 0, len(names) - 1)])
    logits = rng.normal(0, 1, (n, len(names))).astype(np.float32)
    logits[np.arange(n), target] += rng.uniform(1, 12, n).astype(np.float32)
    return np.array([a["id"] for a in data["annotations"]]), logits


def model_like_parts(coco, out, seed: int = 0) -> None:
    """The infer stage's part files for every ROI of `coco` into `out` (an OutputFiles), as run_shard writes them
    (batches of 64, in image order), with the shard's completion marker. Model-like: the predicted class is the
    truth 70% of the time, by a margin from hesitant to confident, and the 1,024-float embedding lies near its
    predicted class's centre, so the embeddings map has neighbourhoods to keep."""
    from fathompipe import atomic

    order = np.lexsort((coco.annotations.id, coco.annotations.image_id))
    rng = np.random.default_rng(seed)
    classes = len(coco.categories)
    centres = rng.normal(0, 1, (classes, 1024)).astype(np.float32)
    out.parts.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(order), 64)):
        rows = order[start:start + 64]
        k = len(rows)
        truth = coco.annotations.category_id[rows] - 1
        target = np.where(rng.random(k) < 0.7, truth, rng.integers(0, classes, k))
        logits = rng.normal(0, 1, (k, classes)).astype(np.float32)
        logits[np.arange(k), target] += rng.uniform(1, 8, k).astype(np.float32)
        embeddings = centres[target] + rng.normal(0, 1.5, (k, 1024)).astype(np.float32)
        np.savez(out.part(0, index), annotation_id=coco.annotations.id[rows], image_id=coco.annotations.image_id[rows],
                 logits=logits, note=np.asarray([""] * k), skipped=np.asarray([], dtype=str), embeddings=embeddings)
    atomic.write_json(out.shard_marker(0, 1), {"rois": len(order), "skipped": 0})
