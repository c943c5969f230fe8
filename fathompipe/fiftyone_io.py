"""FiftyOne: the dataset researchers use, the predictions as a field, an evaluation and a saved view.

Schema (what researchers already have): one sample per image, `filepath` to the local image,
`ground_truth` Detections with normalized boxes, the label and `annotation_id` on each detection,
split tags and a `split` field. Predictions become a Detections field that reuses the ground-truth
boxes, with label, confidence, `annotation_id`, top-5 and the per-detection `hierarchical_distance`.
Writes are bulk (`values` / `set_values`), never a per-sample save loop, and a re-import replaces.

Databases: FiftyOne's bundled MongoDB (default); an external MongoDB via `database_uri`; FiftyOne
Enterprise via FIFTYONE_API_URI and FIFTYONE_API_KEY, which open-source FiftyOne silently ignores:
that case is an error here, not a silent write to a local database.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import pandas as pd

from .annotations import CocoDataset
from .metric import distance


class FiftyOneSetupError(RuntimeError):
    """FiftyOne cannot be used as configured; the message says what to change."""


def configure(database_uri: Optional[str] = None) -> None:
    """Choose the database before fiftyone is imported (FiftyOne reads its config at import)."""
    if os.environ.get("FIFTYONE_API_URI") or os.environ.get("FIFTYONE_API_KEY"):
        if not _enterprise_sdk_installed():
            raise FiftyOneSetupError(
                "FIFTYONE_API_URI/FIFTYONE_API_KEY are set, but the installed FiftyOne is the open-source "
                "package, which ignores them and would write to a local database instead of FiftyOne "
                "Enterprise. Install Voxel51's Enterprise SDK (fiftyone 2.x from their private index), or unset "
                "both variables to use the local or `evaluate.database_uri` database.")
    if database_uri:
        os.environ["FIFTYONE_DATABASE_URI"] = database_uri
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")  # the bundled mongod 6.0 warns otherwise
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")


def _enterprise_sdk_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("fiftyone.management") is not None


def ingest(name: str, dataset: CocoDataset, images_dir: str, split: str, naming: str):
    """Load dataset `name`, adding any image of `dataset` it lacks (matched by annotation_id);
    create it in the researchers' schema if it does not exist."""
    import fiftyone as fo

    ds = fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)
    known = set()
    if len(ds):
        ids = ds.values("ground_truth.detections.annotation_id")
        known = {a for per_sample in ids for a in (per_sample or [])}
    by_image: Dict[int, list] = {}
    for a in dataset.annotations:
        if a.id not in known:
            by_image.setdefault(a.image_id, []).append(a)
    samples = []
    for image_id, anns in by_image.items():
        im = dataset.images[image_id]
        dets = [fo.Detection(label=dataset.categories[a.category_id] if a.category_id is not None else None,
                             bounding_box=[a.bbox[0] / im.width, a.bbox[1] / im.height, a.bbox[2] / im.width,
                                           a.bbox[3] / im.height], annotation_id=a.id) for a in anns]
        samples.append(fo.Sample(filepath=os.path.join(images_dir, im.local_name(naming)), tags=[split], split=split,
                                 image_id=image_id, metadata=fo.ImageMetadata(width=im.width, height=im.height),
                                 ground_truth=fo.Detections(detections=dets)))
    if samples:
        ds.add_samples(samples, progress=False)
        del samples  # while alive, later set_values calls reload them one by one
        ds.add_dynamic_sample_fields()
    return ds


def import_predictions(ds, predictions: pd.DataFrame, field: str, labelled: bool) -> int:
    """Write `field` on every sample in one bulk write; returns the number of predictions written.

    The ground truth is read as plain values (not Detection objects) and the predictions are written
    as the documents FiftyOne itself stores for Detections, in one unordered bulk update: building
    23,699 Detection objects alone takes longer than the whole write (bench/evaluate.py)."""
    import math

    import fiftyone as fo
    import fiftyone.core.odm as foo
    from bson import ObjectId
    from pymongo import UpdateOne

    columns = [predictions.index.tolist(), predictions["concept_name"].tolist()]
    columns.append(predictions["confidence"].tolist() if "confidence" in predictions else [math.nan] * len(predictions))
    has_top5 = "top5_names" in predictions
    if has_top5:
        columns += [predictions["top5_names"].tolist(), predictions["top5_scores"].tolist()]
    lookup = {row[0]: row[1:] for row in zip(*columns)}
    sample_ids = ds.values("_id")
    ann_ids = ds.values("ground_truth.detections.annotation_id")
    boxes = ds.values("ground_truth.detections.bounding_box")
    truths = ds.values("ground_truth.detections.label")
    ops = []
    written = 0
    for sample_id, aids, bxs, lbls in zip(sample_ids, ann_ids, boxes, truths):
        docs = []
        for aid, box, truth in zip(aids or [], bxs or [], lbls or []):
            hit = lookup.get(aid)
            if hit is None:
                continue
            name, confidence = hit[0], hit[1]
            doc = {"_id": ObjectId(), "_cls": "Detection", "attributes": {}, "tags": [], "label": name,
                   "bounding_box": list(box), "annotation_id": int(aid)}
            if confidence is not None and not math.isnan(confidence):
                doc["confidence"] = float(confidence)
            if has_top5:
                doc["top5_names"] = [str(n) for n in hit[2]]
                doc["top5_scores"] = [float(v) for v in hit[3]]
            if labelled and truth is not None:
                doc["hierarchical_distance"] = distance(truth, name)
            docs.append(doc)
        written += len(docs)
        ops.append(UpdateOne({"_id": sample_id}, {"$set": {field: {"_cls": "Detections", "detections": docs}}}))
    if not ds.has_sample_field(field):
        ds.add_sample_field(field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    if ops:
        foo.get_db_conn()[ds._sample_collection_name].bulk_write(ops, ordered=False)
    ds.reload()
    ds.add_dynamic_sample_fields()
    return written


def evaluate_in_app(ds, field: str, split: str, eval_key: str) -> Dict[str, str]:
    """Store an evaluation the App shows (per-class results, a true confusion matrix) and save the
    disagreements, most confident first, as a view."""
    from fiftyone import ViewField as F

    view = ds.match_tags(split)
    if eval_key in ds.list_evaluations():
        ds.delete_evaluation(eval_key)
    # classwise=False matches each prediction to its own ground-truth box (same box: IoU 1) whatever
    # the label, so a wrong label is a confusion in the matrix, not an unmatched box
    view.evaluate_detections(field, gt_field="ground_truth", eval_key=eval_key, classwise=False, iou=0.5,
                             progress=False)
    disagreements = (view.filter_labels(field, F(eval_key) == "fp")
                     .to_patches(field).sort_by(f"{field}.confidence", reverse=True))
    view_name = f"{eval_key}-disagreements"
    ds.save_view(view_name, disagreements, overwrite=True)
    return {"eval_key": eval_key, "saved_view": view_name}


def app_instructions(name: str) -> str:
    return (f"open it: python -c \"import fiftyone as fo; fo.launch_app(fo.load_dataset('{name}'), "
            f"remote=True, port=5151).wait()\"  (from a laptop: ssh -L 5151:localhost:5151 <node>)")


def summary(ds, field: str) -> Dict[str, object]:
    return {"dataset": ds.name, "samples": len(ds), "predictions": int(ds.count(f"{field}.detections")),
            "ground_truth": int(ds.count("ground_truth.detections"))}

