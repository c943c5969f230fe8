"""The researchers' FiftyOne dataset, built the way their scripts build it (GitHub mgustineli/fathomnet-voxel51):

- `02_ingest_dataset.py`: ONE dataset for train and test, one sample per image, `filepath`
  `gs://<bucket>/fathomnet/<split>_images/<file_name>`, fields `split`, `image_id`, `width`, `height`
  (and `date_captured` where the image has one), the split as a tag, `ground_truth` Detections with
  `annotation_id`; a box without a category (the test split) is labelled `unknown`. Plain
  `add_samples` (no dynamic-attribute declaration), then `persistent = True`.
- `06_update_sample_tags.py`: some train samples move from tag `train` to tag `val`; `split` stays `train`.

FathomNet numbers images and annotations from 1 in each split, so test ids collide with train ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

BUCKET = "voxel51-test"


def train_like_subset(folder: Path, n_images: int) -> Path:
    """folder/train.json: the first `n_images` images of a train-sized synthetic set (support.synthetic) with the
    real train split's ids and labels, so tests start from the ids the researchers' dataset has."""
    from conftest import DATA
    from support.synthetic import train_like_coco

    full = train_like_coco(DATA / "train_annotation_labels.csv", DATA / "dataset_test.json", folder / "train_full.json")
    return subset_coco(full, folder / "train.json", n_images)


def subset_coco(source: Path, out: Path, n_images: int) -> Path:
    """The first `n_images` images (by id) of a COCO file with their annotations."""
    raw = json.loads(source.read_text())
    keep = sorted(im["id"] for im in raw["images"])[:n_images]
    wanted = set(keep)
    raw["images"] = [im for im in raw["images"] if im["id"] in wanted]
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] in wanted]
    out.write_text(json.dumps(raw))
    return out


def ingest_like_researchers(name: str, splits: Dict[str, Path], bucket: str = BUCKET):
    """Their 02_ingest_dataset.py, minus tqdm and the credentials: returns the persistent dataset."""
    import fiftyone as fo

    dataset = fo.Dataset(name=name)
    all_samples = []
    for split_name, json_path in splits.items():
        data = json.loads(Path(json_path).read_text())
        categories = {cat["id"]: cat["name"] for cat in data["categories"]}
        by_image: Dict[int, list] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for img in data["images"]:
            sample = fo.Sample(filepath=f"gs://{bucket}/fathomnet/{split_name}_images/{img['file_name']}")
            sample["split"] = split_name
            sample["image_id"] = img["id"]
            sample["width"] = img["width"]
            sample["height"] = img["height"]
            if "date_captured" in img:
                sample["date_captured"] = img["date_captured"]
            detections = []
            for ann in by_image.get(img["id"], []):
                x, y, w, h = ann["bbox"]
                detection = fo.Detection(label=categories.get(ann["category_id"], "unknown"),
                                         bounding_box=[x / img["width"], y / img["height"], w / img["width"],
                                                       h / img["height"]])
                detection["annotation_id"] = ann["id"]
                detections.append(detection)
            sample["ground_truth"] = fo.Detections(detections=detections)
            sample.tags.append(split_name)
            all_samples.append(sample)
    dataset.add_samples(all_samples, progress=False)
    del all_samples
    dataset.persistent = True
    return dataset


def retag_val(dataset, fraction: float = 0.2, seed: int = 42) -> List[str]:
    """Their 06_update_sample_tags.py, unstratified: some train samples go from tag train to tag val."""
    train_ids = dataset.match_tags("train").values("id")
    rng = np.random.default_rng(seed)
    val_ids = [str(i) for i in rng.choice(train_ids, size=int(len(train_ids) * fraction), replace=False)]
    val_samples = dataset.select(val_ids)
    val_samples.untag_samples("train")
    val_samples.tag_samples("val")
    return val_ids


def model_like_predictions(coco_json: Path, out: Path, right: float = 0.7, seed: int = 0,
                           drop: Optional[set] = None) -> pd.DataFrame:
    """Predictions for a labelled split: `right` of them the true label, the rest another category;
    confidence and top-5 as the infer stage writes them (predictions.parquet)."""
    data = json.loads(coco_json.read_text())
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    by_id = {c["id"]: c["name"] for c in data["categories"]}
    rng = np.random.default_rng(seed)
    rows = []
    for a in data["annotations"]:
        if drop and a["id"] in drop:
            continue
        truth = by_id[a["category_id"]]
        pred = truth if rng.random() < right else names[int(rng.integers(len(names)))]
        top5 = [pred] + [n for n in rng.choice(names, 5, replace=False) if n != pred][:4]
        scores = sorted(rng.uniform(0, 1, 5).tolist(), reverse=True)
        rows.append((a["id"], a["image_id"], pred, scores[0], top5, scores))
    df = pd.DataFrame(rows, columns=["annotation_id", "image_id", "concept_name", "confidence", "top5_names",
                                     "top5_scores"])
    df.to_parquet(out)
    return df
