"""FiftyOne: the researchers' dataset, the predictions as a field, an evaluation and a saved view.

Schema (the researchers' `fathomnet-2025`): ONE dataset for both splits, one sample per image, a
`split` field and a split tag, `image_id`, `ground_truth` Detections with `annotation_id` (test
boxes labelled `unknown` or unlabelled), `filepath` local or in cloud storage. FathomNet numbers
images AND annotations from 1 in each split, so a split's samples are selected by the `split`
field (not by tags: retagged `val` samples keep `split: train`) and a prediction lands only on the
ground-truth detection with the same image id and annotation id inside that split. Samples of
other splits are never read for matching and never written.

Predictions become a Detections field reusing the ground-truth boxes (label, confidence,
`annotation_id`, top-5, `hierarchical_distance` on labelled splits). A re-import updates them in
place: the same detection id for the same annotation, tags and any attribute someone added kept.
Writes go through FiftyOne's public API (`values` / `set_values`); only on open-source FiftyOne of the
tested version (RAW_WRITES_TESTED_ON) connected straight to MongoDB a raw bulk write of the same
documents is used (tests show both give identical datasets; bench/evaluate.py measures them).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd

from fathompipe.annotations import CocoDataset
from fathompipe.evaluation.fiftyone_env import api_connection, enterprise_sdk_installed
from fathompipe.evaluation.metric import distance
from fathompipe.evaluation.taxonomy import load_taxonomy

OWN_ATTRIBUTES = ("label", "bounding_box", "confidence", "annotation_id", "top5_names", "top5_scores",
                  "hierarchical_distance")  # what the stage writes on a prediction; everything else is kept


class FiftyOneDataError(ValueError):
    """The dataset in FiftyOne disagrees with what the stage needs; the message names the sample or label."""


def split_view(ds, split: str):
    """The split's samples: chosen by the `split` field, so retagged samples (`val`) stay in."""
    from fiftyone import ViewField as F
    return ds.match(F("split") == split)


def ingest(name: str, dataset: CocoDataset, images_dir: str, split: str, naming: str, raw: Optional[bool] = None):
    """Load dataset `name` (create it if missing) and add the images of `split` it lacks, matched by
    `image_id` among that split's samples only. One sample goes through `add_samples`, which declares the
    schema (split, image_id, ground_truth and its dynamic `annotation_id`); the rest are written as plain
    documents where raw writes are allowed (`raw=None`: `raw_writes_allowed()`), else through `add_samples`
    without re-deriving the schema per sample (where most of its time went)."""
    import fiftyone as fo

    ds = fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)
    if len(ds) and not ds.has_sample_field("split"):
        raise FiftyOneDataError(f"dataset '{name}' has no `split` field: fathompipe selects a split's samples by "
                                f"it (the researchers' schema); add it, or choose another evaluate.dataset")
    known = set(split_view(ds, split).values("image_id")) if len(ds) else set()
    by_image: Dict[int, list] = {}
    for a in dataset.annotations:
        by_image.setdefault(a.image_id, []).append(a)
    docs = [_sample_doc(dataset, im, by_image.get(image_id, []), os.path.join(images_dir, im.local_name(naming)),
                        split)
            for image_id, im in dataset.images.items() if image_id not in known]
    if not docs:
        return ds
    first = next((i for i, d in enumerate(docs) if d["ground_truth"]["detections"]), 0)
    ds.add_samples([fo.Sample.from_dict(docs.pop(first))], progress=False, dynamic=True)
    if docs and (raw_writes_allowed() if raw is None else raw):
        _insert_raw(ds, docs)
    elif docs:
        ds.add_samples([fo.Sample.from_dict(d) for d in docs], progress=False, expand_schema=False)
    return ds


def _sample_doc(dataset: CocoDataset, im, annotations: list, filepath: str, split: str) -> Dict[str, Any]:
    """A sample as FiftyOne stores it (none-valued attributes omitted), ids and timestamps left to the writer."""
    dets = []
    for a in annotations:
        det = {"_cls": "Detection", "tags": [], "attributes": {},
               "bounding_box": [a.bbox[0] / im.width, a.bbox[1] / im.height, a.bbox[2] / im.width,
                                a.bbox[3] / im.height], "annotation_id": a.id}
        if a.category_id is not None:
            det["label"] = dataset.categories[a.category_id]
        dets.append(det)
    return {"filepath": filepath, "tags": [split], "split": split, "image_id": im.id,
            "metadata": {"_cls": "ImageMetadata", "width": im.width, "height": im.height},
            "ground_truth": {"_cls": "Detections", "detections": dets}}


def _insert_raw(ds, docs: List[Dict[str, Any]]) -> None:
    """`docs` completed as `add_samples` completes them (ids, dataset id, media type, `_rand`, timestamps) and
    inserted in one unordered `insert_many`; tests/test_fiftyone_dataset.py compares the stored documents."""
    import random
    from datetime import datetime, timezone

    from bson import ObjectId

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for d in docs:
        for det in d["ground_truth"]["detections"]:
            det["_id"] = ObjectId()
        d.update(_id=ObjectId(), _dataset_id=ds._doc.id, _media_type="image", _rand=random.random() * 0.001 + 0.999,
                 created_at=now, last_modified_at=now)  # _rand as fiftyone.core.odm.sample._generate_rand draws it
    # private API (fiftyone 1.22.1): the dataset's sample collection and its document (`_doc.id`), as _write_raw
    ds._sample_collection.insert_many(docs, ordered=False)


@dataclass
class SplitTruth:
    """The split's samples and ground truth as plain values, in the order of `split_view`."""

    sample_ids: List[str]
    image_ids: List[int]
    annotation_ids: List[List[Optional[int]]]
    labels: List[List[Optional[str]]]
    boxes: List[List[List[float]]]


def read_truth(view, name: str, split: str) -> SplitTruth:
    truth = SplitTruth(view.values("id"), view.values("image_id"),
                       *[[v or [] for v in view.values(f"ground_truth.detections.{a}")]
                         for a in ("annotation_id", "label", "bounding_box")])
    seen: Dict[int, str] = {}
    for sid, iid in zip(truth.sample_ids, truth.image_ids):
        if iid in seen:
            raise FiftyOneDataError(f"dataset '{name}', split {split}: samples {seen[iid]} and {sid} both have "
                                    f"image_id {iid}; each image must be one sample per split")
        seen[iid] = sid
    return truth


def check_labels(truth: SplitTruth, name: str, split: str) -> None:
    """On a labelled split every ground-truth label must be one of the 79 categories (the metric's)."""
    names = set(load_taxonomy())
    for iid, aids, labels in zip(truth.image_ids, truth.annotation_ids, truth.labels):
        for aid, label in zip(aids, labels):
            if label not in names:
                raise FiftyOneDataError(f"dataset '{name}', split {split}: annotation {aid} (image {iid}) has the "
                                        f"ground-truth label {label!r}, not one of the 79 FathomNet categories; "
                                        f"correct it in FiftyOne, then rerun the evaluate stage")


@dataclass
class ImportResult:
    written: int  # predictions on their ground-truth detection
    unmatched: int  # predictions whose image/annotation pair is not in the dataset's split
    raw: bool  # written with the raw bulk path


def prediction_docs(truth: SplitTruth, coco: CocoDataset, predictions: pd.DataFrame, labelled: bool,
                    existing: List[List[Dict[str, Any]]]) -> Tuple[List[List[Dict[str, Any]]], int, int]:
    """Per sample, the prediction documents after this import, in ground-truth order.

    `existing` holds the field's current detection documents per sample: a prediction for the same
    annotation keeps its `_id`, tags and every attribute the stage does not own; detections without
    `annotation_id` (added by hand) stay at the end. Returns (documents, written, unmatched)."""
    from bson import ObjectId

    image_of = {a.id: a.image_id for a in coco.annotations}
    n = len(predictions)
    columns = [predictions.index.tolist(), predictions["concept_name"].tolist(),
               predictions["confidence"].tolist() if "confidence" in predictions else [None] * n]
    has_top5 = "top5_names" in predictions
    if has_top5:
        columns += [predictions["top5_names"].tolist(), predictions["top5_scores"].tolist()]
    lookup = {row[0]: row[1:] for row in zip(*columns)}
    out: List[List[Dict[str, Any]]] = []
    written = 0
    for iid, aids, labels, boxes, old in zip(truth.image_ids, truth.annotation_ids, truth.labels, truth.boxes,
                                             existing):
        by_annotation = {d.get("annotation_id"): d for d in old if d.get("annotation_id") is not None}
        docs: List[Dict[str, Any]] = []
        for aid, label, box in zip(aids, labels, boxes):
            hit = lookup.get(aid)
            if hit is None or image_of.get(aid) != iid:
                continue  # not this split's annotation of this image: never match across images or splits
            doc = dict(by_annotation.get(aid) or {"_id": ObjectId(), "_cls": "Detection", "attributes": {},
                                                  "tags": []})
            for attr in OWN_ATTRIBUTES:
                doc.pop(attr, None)
            name, conf = str(hit[0]), hit[1]
            doc.update(label=name, bounding_box=[float(v) for v in box], annotation_id=int(aid))
            if conf is not None and not math.isnan(conf):
                doc["confidence"] = float(conf)
            if has_top5:
                doc["top5_names"] = [str(v) for v in hit[2]]
                doc["top5_scores"] = [float(v) for v in hit[3]]
            if labelled:
                doc["hierarchical_distance"] = distance(label, name)
            docs.append(doc)
        written += len(docs)
        docs += [d for d in old if d.get("annotation_id") is None]
        out.append(docs)
    unmatched = len(lookup.keys() & image_of.keys()) - written
    return out, written, max(unmatched, 0)


def declare_fields(ds, field: str, labelled: bool) -> None:
    """The predictions field and the attributes the stage writes, declared like any FiftyOne field."""
    import fiftyone as fo

    if not ds.has_sample_field(field):
        ds.add_sample_field(field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    attributes = [("annotation_id", fo.IntField, None), ("top5_names", fo.ListField, fo.StringField),
                  ("top5_scores", fo.ListField, fo.FloatField)]
    if labelled:
        attributes.append(("hierarchical_distance", fo.IntField, None))
    for attr, ftype, sub in attributes:
        path = f"{field}.detections.{attr}"
        if not ds.has_sample_field(path):
            ds.add_sample_field(path, ftype, subfield=sub)


RAW_WRITES_TESTED_ON = "1.22.1"  # constraints.txt pins it; tests/test_fiftyone_dataset.py compares the two paths


def raw_writes_allowed() -> bool:
    """The raw bulk write (private parts: `Dataset._sample_collection`, `_doc.id`) only where tests prove it equal
    to the public API: open-source FiftyOne of exactly the tested version, connected straight to MongoDB (never
    through an Enterprise API server). Any other version pyproject.toml admits takes the public path."""
    import fiftyone.constants as foc
    return not api_connection() and not enterprise_sdk_installed() and foc.VERSION == RAW_WRITES_TESTED_ON


def import_predictions(ds, split: str, coco: CocoDataset, predictions: pd.DataFrame, field: str, labelled: bool,
                       raw: Optional[bool] = None) -> ImportResult:
    """Write `field` on the split's samples (and no other); `raw=None` picks the path allowed here."""
    view = split_view(ds, split)
    truth = read_truth(view, ds.name, split)
    if labelled:
        check_labels(truth, ds.name, split)
    raw = raw_writes_allowed() if raw is None else raw
    declare_fields(ds, field, labelled)
    if raw:
        written, unmatched = _write_raw(ds, view, truth, coco, predictions, field, labelled)
    else:
        written, unmatched = _write_public(view, truth, coco, predictions, field, labelled)
    ds.reload()
    return ImportResult(written, unmatched, raw)


def _write_public(view, truth: SplitTruth, coco: CocoDataset, predictions: pd.DataFrame, field: str,
                  labelled: bool) -> Tuple[int, int]:
    """FiftyOne's public API: the field read as Detections, one `set_values` (works through Enterprise's API)."""
    import fiftyone as fo

    current = view.values(field)
    existing = [[d.to_dict() for d in value.detections] if value is not None else [] for value in current]
    docs, written, unmatched = prediction_docs(truth, coco, predictions, labelled, existing)
    values = []
    for value, per_sample in zip(current, docs):
        dets = [fo.Detection.from_dict(d) for d in per_sample]
        if value is None:
            value = fo.Detections()
        value.detections = dets
        values.append(value)
    view.set_values(field, values)
    return written, unmatched


def _write_raw(ds, view, truth: SplitTruth, coco: CocoDataset, predictions: pd.DataFrame, field: str,
               labelled: bool) -> Tuple[int, int]:
    """The same documents as `_write_public`, read and written with pymongo in one unordered bulk write."""
    from datetime import datetime, timezone

    from bson import ObjectId
    from pymongo import UpdateOne

    ids = [ObjectId(s) for s in truth.sample_ids]
    # private API (fiftyone 1.22.1): the dataset's sample collection; the documents match what set_values
    # writes (tests/test_fiftyone_dataset.py compares both paths), ~4x faster on 23,699 predictions
    collection = ds._sample_collection
    stored = {d["_id"]: d.get(field) for d in collection.find({"_id": {"$in": ids}}, {field: 1})}
    containers = [stored.get(i) or {"_cls": "Detections", "detections": []} for i in ids]
    existing = [list(c.get("detections") or []) for c in containers]
    docs, written, unmatched = prediction_docs(truth, coco, predictions, labelled, existing)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    ops = [UpdateOne({"_id": i}, {"$set": {field: {**c, "detections": d}, "last_modified_at": now}})
           for i, c, d in zip(ids, containers, docs)]
    if ops:
        collection.bulk_write(ops, ordered=False)
    return written, unmatched


def evaluate_in_app(ds, field: str, split: str, eval_key: str, mistakenness: Optional[Dict[int, float]] = None,
                    raw: Optional[bool] = None) -> Dict[str, str]:
    """Store the split's evaluation (per-class results, a true confusion matrix; recomputed on every
    import, so never stale) and save the review views (fiftyone_review). Other evaluations and saved
    views are left alone. `mistakenness`: annotation_id -> score (scoring.py's)."""
    from fathompipe.evaluation import fiftyone_eval, fiftyone_review

    view = split_view(ds, split)
    raw = raw_writes_allowed() if raw is None else raw
    fiftyone_eval.evaluate(ds, view, field, eval_key, mistakenness or {}, raw)
    return {"eval_key": eval_key, **fiftyone_review.save_views(ds, view, field, eval_key)}


APP_PORT = 5151


def app_command(name: str, view: Optional[str] = None) -> str:
    """Opens the App on this node's loopback only (the open-source App has no login): reach it through a tunnel."""
    target = f"fo.load_dataset('{name}')" + (f".load_saved_view('{view}')" if view else "")
    return (f"python -c \"import fiftyone as fo; fo.launch_app({target}, remote=True, address='127.0.0.1', "
            f"port={APP_PORT}).wait()\"")


def app_instructions(name: str, view: Optional[str] = None) -> str:
    return (f"open it: {app_command(name, view)}  (from a laptop: ssh -L {APP_PORT}:127.0.0.1:{APP_PORT} <node>, "
            f"then http://127.0.0.1:{APP_PORT})")


def summary(ds, field: str, split: str) -> Dict[str, object]:
    view = split_view(ds, split)
    return {"dataset": ds.name, "samples": len(view), "predictions": int(view.count(f"{field}.detections")),
            "ground_truth": int(view.count("ground_truth.detections")), "dataset_samples": len(ds)}
