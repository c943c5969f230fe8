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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from fathompipe.annotations import NO_CATEGORY, Coco
from fathompipe.evaluation.fiftyone_env import api_connection, enterprise_sdk_installed
from fathompipe.evaluation.metric import distance
from fathompipe.evaluation.taxonomy import load_taxonomy
from fathompipe.predictions import Predictions

OWN_ATTRIBUTES = ("label", "bounding_box", "confidence", "annotation_id", "top5_names", "top5_scores",
                  "hierarchical_distance")  # what the stage writes on a prediction; everything else is kept


class FiftyOneDataError(ValueError):
    """The dataset in FiftyOne disagrees with what the stage needs; the message names the sample or label."""


def split_view(ds, split: str):
    """The split's samples: chosen by the `split` field, so retagged samples (`val`) stay in."""
    from fiftyone import ViewField as F
    return ds.match(F("split") == split)


BATCH = 5_000  # samples read and written at a time (~13,000 ROIs at 2.64 a sample): memory does not grow with N


def batches(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), BATCH):
        yield items[start:start + BATCH]


def ingest(name: str, dataset: Coco, images_dir: str, split: str, naming: str, raw: Optional[bool] = None):
    """Load dataset `name` (create it if missing) and add the images of `split` it lacks, matched by
    `image_id` among that split's samples only, in batches of BATCH images. One sample goes through
    `add_samples`, which declares the schema (split, image_id, ground_truth and its dynamic `annotation_id`);
    the rest are written as plain documents where raw writes are allowed (`raw=None`: `raw_writes_allowed()`),
    else through `add_samples` without re-deriving the schema per sample (where most of its time went)."""
    import fiftyone as fo

    ds = fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)
    if len(ds) and not ds.has_sample_field("split"):
        raise FiftyOneDataError(f"dataset '{name}' has no `split` field: fathompipe selects a split's samples by "
                                f"it (the researchers' schema); add it, or choose another evaluate.dataset")
    known = np.asarray(split_view(ds, split).values("image_id") if len(ds) else [], np.int64)
    rows = np.flatnonzero(~np.isin(dataset.images.id, known))  # images of the split not in the dataset yet
    if not len(rows):
        return ds
    raw = raw_writes_allowed() if raw is None else raw
    rois = RoisByImage(dataset)
    first = next((r for r in rows if rois.count(int(dataset.images.id[r]))), rows[0])  # one with a box, if any
    ds.add_samples([fo.Sample.from_dict(_sample_doc(dataset, rois, int(first), images_dir, naming, split))],
                   progress=False, dynamic=True)
    for batch in batches(rows[rows != first]):
        docs = [_sample_doc(dataset, rois, int(r), images_dir, naming, split) for r in batch]
        if raw:
            _insert_raw(ds, docs)
        else:
            ds.add_samples([fo.Sample.from_dict(d) for d in docs], progress=False, expand_schema=False)
    return ds


class RoisByImage:
    """The rows of each image's ROIs in the annotation file, in file order, found by binary search."""

    def __init__(self, dataset: Coco):
        self.order = np.argsort(dataset.annotations.image_id, kind="stable")
        self.image_ids = dataset.annotations.image_id[self.order]

    def rows(self, image_id: int) -> np.ndarray:
        return self.order[np.searchsorted(self.image_ids, image_id):np.searchsorted(self.image_ids, image_id, "right")]

    def count(self, image_id: int) -> int:
        return len(self.rows(image_id))


def _sample_doc(dataset: Coco, rois: RoisByImage, row: int, images_dir: str, naming: str, split: str
                ) -> Dict[str, Any]:
    """Image `row` as FiftyOne stores a sample (none-valued attributes omitted), ids and timestamps left to the
    writer."""
    im = dataset.images[row]
    an = dataset.annotations
    dets = []
    for r in rois.rows(im.id).tolist():
        x, y, w, h = an.bbox[r].tolist()
        det = {"_cls": "Detection", "tags": [], "attributes": {},
               "bounding_box": [x / im.width, y / im.height, w / im.width, h / im.height],
               "annotation_id": int(an.id[r])}
        if an.category_id[r] != NO_CATEGORY:
            det["label"] = dataset.categories[int(an.category_id[r])]
        dets.append(det)
    return {"filepath": os.path.join(images_dir, im.local_name(naming)), "tags": [split], "split": split,
            "image_id": im.id, "metadata": {"_cls": "ImageMetadata", "width": im.width, "height": im.height},
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
class RoiValues:
    """What the stage writes on each ROI with a prediction, sorted by annotation id and looked up batch by batch:
    the prediction, its confidence and top-5, and the review scores from scoring (about 60 bytes a ROI)."""

    annotation_id: np.ndarray  # int64, ascending
    image_id: np.ndarray  # int64: the ROI's image in the annotation file; -1 when the file has no such ROI
    label: np.ndarray  # object: the predicted name
    confidence: np.ndarray  # float64, NaN: none
    top5: Optional[np.ndarray]  # (N, 5) int16 into `vocabulary`
    top5_scores: Optional[np.ndarray]  # (N, 5) float32
    vocabulary: List[str]
    mistakenness: np.ndarray  # float64, NaN: none
    rule_label: Optional[np.ndarray]  # object: the expected-distance rule's name (None without logits)
    correct: Optional[np.ndarray]  # bool: the prediction is the annotation file's label (None: unlabelled)

    @classmethod
    def of(cls, dataset: Coco, predictions: Predictions, table: Optional[pd.DataFrame] = None) -> "RoiValues":
        """From the predictions and, for the review scores, scoring's per-ROI table (the annotation file's order)."""
        n = len(predictions)
        order = np.argsort(dataset.annotations.id, kind="stable")
        ids = dataset.annotations.id[order]
        at = np.searchsorted(ids, predictions.annotation_id).clip(0, max(len(ids) - 1, 0))
        found = (ids[at] == predictions.annotation_id) if len(ids) else np.zeros(n, bool)
        image_id = np.where(found, dataset.annotations.image_id[order[at]] if len(ids) else -1, -1)
        mistakenness, rule, correct = np.full(n, np.nan), None, None
        if table is not None:
            rows = predictions.rows_of(table["annotation_id"].to_numpy())
            has = rows >= 0
            if "mistakenness" in table:
                mistakenness[rows[has]] = table["mistakenness"].to_numpy(np.float64)[has]
            if "rule_prediction" in table:
                rule = np.full(n, None, object)
                rule[rows[has]] = table["rule_prediction"].to_numpy()[has]
            if "correct" in table:
                correct = np.zeros(n, bool)
                correct[rows[has]] = table["correct"].to_numpy()[has]
        return cls(predictions.annotation_id, image_id, predictions.concept_name,
                   predictions.confidence.astype(np.float64), predictions.top5, predictions.top5_scores,
                   predictions.vocabulary, mistakenness, rule, correct)

    def rows_of(self, ids: Sequence[Optional[int]]) -> np.ndarray:
        """The row of each annotation id; -1 for an id without a prediction (or None: a box added by hand)."""
        wanted = np.asarray([-1 if i is None else i for i in ids], np.int64)
        if not len(self.annotation_id):
            return np.full(len(wanted), -1, np.int64)
        at = np.searchsorted(self.annotation_id, wanted).clip(0, len(self.annotation_id) - 1)
        return np.where((self.annotation_id[at] == wanted) & (wanted >= 0), at, -1)


@dataclass
class SplitTruth:
    """Some samples of a split and their ground truth as plain values, in the order of the view they came from."""

    sample_ids: List[str]
    image_ids: List[int]
    annotation_ids: List[List[Optional[int]]]
    labels: List[List[Optional[str]]]
    boxes: List[List[List[float]]]


def read_truth(view) -> SplitTruth:
    return SplitTruth(view.values("id"), view.values("image_id"),
                      *[[v or [] for v in view.values(f"ground_truth.detections.{a}")]
                        for a in ("annotation_id", "label", "bounding_box")])


def check_split(view, name: str, split: str, labelled: bool) -> List[str]:
    """The split's sample ids, after checking what the import relies on: one sample per image and, on a labelled
    split, every ground-truth label one of the 79 categories (asked of the database, not read sample by sample)."""
    from fiftyone import ViewField as F

    sample_ids, image_ids = view.values("id"), np.asarray(view.values("image_id"), np.int64)
    order = np.argsort(image_ids, kind="stable")
    twice = np.flatnonzero(np.diff(image_ids[order]) == 0)
    if len(twice):
        a, b = order[twice[0]], order[twice[0] + 1]
        raise FiftyOneDataError(f"dataset '{name}', split {split}: samples {sample_ids[a]} and {sample_ids[b]} both "
                                f"have image_id {image_ids[a]}; each image must be one sample per split")
    if labelled:
        names = set(load_taxonomy())
        for label in view.distinct("ground_truth.detections.label") + ([None] if view.count(
                "ground_truth.detections") > view.count("ground_truth.detections.label") else []):
            if label in names:
                continue
            bad = view.filter_labels("ground_truth", F("label") == label if label is not None else ~F("label").exists())
            aid, iid = bad.first().ground_truth.detections[0].annotation_id, bad.first().image_id
            raise FiftyOneDataError(f"dataset '{name}', split {split}: annotation {aid} (image {iid}) has the "
                                    f"ground-truth label {label!r}, not one of the 79 FathomNet categories; "
                                    f"correct it in FiftyOne, then rerun the evaluate stage")
    return sample_ids


@dataclass
class ImportResult:
    written: int  # predictions on their ground-truth detection
    unmatched: int  # predictions whose image/annotation pair is not in the dataset's split
    raw: bool  # written with the raw bulk path


def prediction_docs(truth: SplitTruth, values: RoiValues, labelled: bool,
                    existing: List[List[Dict[str, Any]]]) -> Tuple[List[List[Dict[str, Any]]], int]:
    """Per sample, the prediction documents after this import, in ground-truth order.

    `existing` holds the field's current detection documents per sample: a prediction for the same
    annotation keeps its `_id`, tags and every attribute the stage does not own; detections without
    `annotation_id` (added by hand) stay at the end. Returns (documents, written)."""
    from bson import ObjectId

    out: List[List[Dict[str, Any]]] = []
    written = 0
    for iid, aids, labels, boxes, old in zip(truth.image_ids, truth.annotation_ids, truth.labels, truth.boxes,
                                             existing):
        by_annotation = {d.get("annotation_id"): d for d in old if d.get("annotation_id") is not None}
        docs: List[Dict[str, Any]] = []
        for aid, label, box, row in zip(aids, labels, boxes, values.rows_of(aids).tolist()):
            if row < 0 or values.image_id[row] != iid:
                continue  # not this split's annotation of this image: never match across images or splits
            doc = dict(by_annotation.get(aid) or {"_id": ObjectId(), "_cls": "Detection", "attributes": {},
                                                  "tags": []})
            for attr in OWN_ATTRIBUTES:
                doc.pop(attr, None)
            name, conf = str(values.label[row]), float(values.confidence[row])
            doc.update(label=name, bounding_box=[float(v) for v in box], annotation_id=int(aid))
            if not math.isnan(conf):
                doc["confidence"] = conf
            if values.top5 is not None and values.top5_scores is not None:
                doc["top5_names"] = [values.vocabulary[k] for k in values.top5[row].tolist()]
                doc["top5_scores"] = values.top5_scores[row].tolist()
            if labelled:
                doc["hierarchical_distance"] = distance(label, name)
            docs.append(doc)
        written += len(docs)
        docs += [d for d in old if d.get("annotation_id") is None]
        out.append(docs)
    return out, written


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


def import_predictions(ds, split: str, values: RoiValues, field: str, labelled: bool,
                       raw: Optional[bool] = None) -> ImportResult:
    """Write `field` on the split's samples (and no other), BATCH samples at a time; `raw=None` picks the path
    allowed here."""
    view = split_view(ds, split)
    sample_ids = check_split(view, ds.name, split, labelled)
    raw = raw_writes_allowed() if raw is None else raw
    declare_fields(ds, field, labelled)
    written = 0
    for batch in batches(sample_ids):
        if raw:
            written += _write_raw(ds, batch, values, field, labelled)
        else:
            written += _write_public(ds.select(batch, ordered=True), values, field, labelled)
    ds.reload()
    return ImportResult(written, int((values.image_id >= 0).sum()) - written, raw)


def _write_public(view, values: RoiValues, field: str, labelled: bool) -> int:
    """FiftyOne's public API on one batch: the field read as Detections, one `set_values` (works through
    Enterprise's API)."""
    import fiftyone as fo

    current = view.values(field)
    existing = [[d.to_dict() for d in value.detections] if value is not None else [] for value in current]
    docs, written = prediction_docs(read_truth(view), values, labelled, existing)
    out = []
    for value, per_sample in zip(current, docs):
        dets = [fo.Detection.from_dict(d) for d in per_sample]
        if value is None:
            value = fo.Detections()
        value.detections = dets
        out.append(value)
    view.set_values(field, out)
    return written


def _write_raw(ds, sample_ids: Sequence[str], values: RoiValues, field: str, labelled: bool) -> int:
    """The same documents as `_write_public`, read and written with pymongo in one unordered bulk write a batch."""
    from datetime import datetime, timezone

    from bson import ObjectId
    from pymongo import UpdateOne

    ids = [ObjectId(s) for s in sample_ids]
    # private API (fiftyone 1.22.1): the dataset's sample collection; the documents match what set_values
    # writes (tests/test_fiftyone_dataset.py compares both paths), ~4x faster on 23,699 predictions
    collection = ds._sample_collection
    stored = {d["_id"]: d for d in collection.find({"_id": {"$in": ids}}, {"image_id": 1, "ground_truth": 1,
                                                                          field: 1})}
    docs_in = [stored[i] for i in ids]
    gts = [(d.get("ground_truth") or {}).get("detections") or [] for d in docs_in]
    truth = SplitTruth(sample_ids, [d.get("image_id") for d in docs_in],
                       [[g.get("annotation_id") for g in dets] for dets in gts],
                       [[g.get("label") for g in dets] for dets in gts],
                       [[g.get("bounding_box") for g in dets] for dets in gts])
    containers = [d.get(field) or {"_cls": "Detections", "detections": []} for d in docs_in]
    existing = [list(c.get("detections") or []) for c in containers]
    docs, written = prediction_docs(truth, values, labelled, existing)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    ops = [UpdateOne({"_id": i}, {"$set": {field: {**c, "detections": d}, "last_modified_at": now}})
           for i, c, d in zip(ids, containers, docs)]
    if ops:
        collection.bulk_write(ops, ordered=False)
    return written


def evaluate_in_app(ds, field: str, split: str, eval_key: str, values: RoiValues, raw: Optional[bool] = None,
                    more=None) -> Dict[str, str]:
    """Store the split's evaluation (per-class results, a true confusion matrix; recomputed on every
    import, so never stale) and save the review views (fiftyone_review). Other evaluations and saved
    views are left alone. `values`: the review scores (scoring.py's); `more`: fiftyone_eval.Extras."""
    from fathompipe.evaluation import fiftyone_eval, fiftyone_review

    view = split_view(ds, split)
    raw = raw_writes_allowed() if raw is None else raw
    fiftyone_eval.evaluate(ds, view, field, eval_key, values, raw, more)
    return {"eval_key": eval_key, **fiftyone_review.save_views(ds, view, field, eval_key, values)}


def app_command(name: str, view: Optional[str] = None, database_dir: Optional[str] = None) -> str:
    """The App for its user only, until Ctrl-C (fathompipe/app.py): it prints the private URL and the ssh -L line."""
    import shlex
    return " ".join(["python -m fathompipe.app --dataset", shlex.quote(name)]
                    + (["--view", shlex.quote(view)] if view else [])
                    + (["--database-dir", shlex.quote(database_dir)] if database_dir else []))


def app_instructions(name: str, view: Optional[str] = None, database_dir: Optional[str] = None) -> str:
    return (f"open it: {app_command(name, view, database_dir)}  (on this node or a login node; it prints a private "
            f"URL and the ssh -L line for a laptop, and serves until Ctrl-C)")


def summary(ds, field: str, split: str) -> Dict[str, object]:
    view = split_view(ds, split)
    return {"dataset": ds.name, "samples": len(view), "predictions": int(view.count(f"{field}.detections")),
            "ground_truth": int(view.count("ground_truth.detections")), "dataset_samples": len(ds)}
