"""The App's stored evaluation of a split, without FiftyOne's box matching.

`evaluate_detections` matches every prediction to a ground-truth box by IoU, loading and saving each
sample (about three quarters of the stage's time at train size). Here the match is already known:
each prediction sits on the ground-truth box with its `annotation_id`. So the same per-label fields
(`<eval_key>` tp/fp/fn, `<eval_key>_id`, `<eval_key>_iou`), per-sample counts and stored results
(classwise=False semantics: a wrong label is `fp` on the prediction, `fn` on the ground truth and one
confusion in the matrix) are written in bulk and registered through FiftyOne's evaluation-method API,
so `load_evaluation_results`, `to_evaluation_patches` and the App's Model Evaluation panel work as
after `evaluate_detections`. The review attributes (predicted label, confidence, mistakenness and the
expected-distance rule's label) are written on the ground-truth detections in the same bulk write.

What FiftyOne 1.22.1's Model Evaluation panel reads (plugins/panels/model_evaluation): the stored results'
`classes` (the matrix's rows and columns in that order) plus `missing` ("(none)", always added), the matrix
from `ytrue`/`ypred`, and its Summary's TP/FP/FN counted from those arrays (FP: ytrue == missing, FN: ypred ==
missing). With classwise=False every ROI is one matched pair, so a wrong label is an off-diagonal cell, not a
(none) one, and those two counts read "-" (0); its front end also leaves out every class whose diagonal cell is
0 (a class the model never gets right). So the stage orders `classes` taxonomically (relatives together, as in
report.html) and adds the counts and scores the panel cannot derive as the results' custom metrics (rows of its
Summary): the competition's mean hierarchical distance, the expected-distance rule's, the wrong labels (each an
FP on the prediction and an FN on the truth in the per-label fields) and the ROIs without a prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Dict, List, Optional, Tuple

from fathompipe.evaluation.fiftyone_io import RoiValues, batches
from fathompipe.evaluation.taxonomy import taxonomic_order

CUSTOM_METRIC = "@fathompipe/evaluate/"  # the prefix of the custom metrics' keys (no operator computes them)


@dataclass
class Extras:
    """The Summary rows the stage adds to the stored evaluation (custom metrics): key -> (label in the panel,
    value, lower is better)."""

    summary: Dict[str, Tuple[str, float, bool]] = dataclass_field(default_factory=dict)


def extras(metrics: Dict[str, Any]) -> Extras:
    """From scoring.score's metrics (a labelled split)."""
    out = Extras()
    own = metrics.get("predicted_only") or {}
    if own.get("mean_hierarchical_distance") is not None:
        out.summary["mean_hierarchical_distance"] = (
            "Mean hierarchical distance (predicted ROIs)", own["mean_hierarchical_distance"], True)
    rule = metrics.get("expected_distance_rule") or {}
    if "mean_hierarchical_distance_rule" in rule:
        out.summary["mean_hierarchical_distance_rule"] = (
            "... with the expected-distance rule", rule["mean_hierarchical_distance_rule"], True)
    if "mean_hierarchical_distance" in metrics:
        out.summary["competition_score"] = ("Competition score (a missing ROI scores 12)",
                                            metrics["mean_hierarchical_distance"], True)
    if "n_disagreements" in metrics:
        out.summary["wrong_labels"] = ("Wrong labels (an FP and an FN each)", metrics["n_disagreements"], True)
    out.summary["not_predicted"] = ("ROIs without a prediction (FN)", metrics.get("n_missing_predictions", 0), True)
    return out


@dataclass
class SplitLabels:
    """Per sample of a batch, the ground-truth and prediction detections as plain values."""

    gt_ids: List[List[str]]
    gt_labels: List[List[Optional[str]]]
    gt_annotations: List[List[Optional[int]]]
    pred_ids: List[List[str]]
    pred_labels: List[List[Optional[str]]]
    pred_confidences: List[List[Optional[float]]]
    pred_annotations: List[List[Optional[int]]]


def read_labels(view, field: str) -> SplitLabels:
    def per_sample(path: str) -> list:
        return [v or [] for v in view.values(path)]
    return SplitLabels(*[per_sample(f"ground_truth.detections.{a}") for a in ("id", "label", "annotation_id")],
                       *[per_sample(f"{field}.detections.{a}") for a in ("id", "label", "confidence", "annotation_id")])


class Matches:
    """FiftyOne's matches (gt_label, pred_label, iou, confidence, gt_id, pred_id), kept as one column each across
    batches: names shared between rows, never one tuple per ROI (2M tuples alone would take 1 GB)."""

    def __init__(self) -> None:
        self.columns: List[List[Any]] = [[] for _ in range(6)]
        self.names: Dict[Optional[str], Optional[str]] = {}

    def add(self, gt_label: Optional[str], pred_label: Optional[str], iou: Optional[float],
            confidence: Optional[float], gt_id: Optional[str], pred_id: Optional[str]) -> None:
        gt_label, pred_label = (self.names.setdefault(n, n) for n in (gt_label, pred_label))
        for column, value in zip(self.columns, (gt_label, pred_label, iou, confidence, gt_id, pred_id)):
            column.append(value)

    def __len__(self) -> int:
        return len(self.columns[0])

    def classes(self) -> List[str]:
        """The names that occur, in taxonomic order (names outside the 79 after them): the panel's matrix order."""
        seen = {n for n in self.names if n is not None}
        order = [n for n in taxonomic_order() if n in seen]
        return order + sorted(seen - set(order))


@dataclass
class Attributes:
    """What is written for a batch: per sample, per detection (in stored order) the attribute values."""

    gt: List[List[Dict[str, Any]]]
    pred: List[List[Dict[str, Any]]]
    counts: Dict[str, List[int]]  # <eval_key>_tp/_fp/_fn per sample


def attributes(labels: SplitLabels, eval_key: str, values: RoiValues, matches: Matches) -> Attributes:
    """The fields `evaluate_detections(classwise=False)` writes when each prediction lies on its own box, and the
    review attributes (scoring's mistakenness and the expected-distance rule's label, from `values`); the batch's
    matches are added to `matches`."""
    id_key, iou_key = f"{eval_key}_id", f"{eval_key}_iou"
    gt_out, pred_out = [], []
    counts: Dict[str, List[int]] = {f"{eval_key}_{k}": [] for k in ("tp", "fp", "fn")}

    aids = [aid for sample in labels.gt_annotations + labels.pred_annotations for aid in sample]
    row_of = dict(zip(aids, values.rows_of(aids).tolist()))  # one search for the batch

    def review(aid: Optional[int]) -> Tuple[Optional[float], Optional[str]]:
        row = row_of.get(aid, -1)
        if row < 0:
            return None, None
        m = float(values.mistakenness[row])
        return (None if math.isnan(m) else m), (None if values.rule_label is None else values.rule_label[row])

    for g_ids, g_labels, g_aids, p_ids, p_labels, p_confs, p_aids in zip(
            labels.gt_ids, labels.gt_labels, labels.gt_annotations, labels.pred_ids, labels.pred_labels,
            labels.pred_confidences, labels.pred_annotations):
        pred_of = {aid: i for i, aid in enumerate(p_aids) if aid is not None}
        gt_of = {aid: i for i, aid in enumerate(g_aids) if aid is not None}
        tp = fp = fn = 0
        gts = []
        for gid, glabel, aid in zip(g_ids, g_labels, g_aids):
            j = pred_of.get(aid) if aid is not None else None
            if j is None:
                gts.append({eval_key: "fn", id_key: "", iou_key: None, "predicted_label": None,
                            "predicted_confidence": None, "mistakenness": None, "rule_label": None})
                matches.add(glabel, None, None, None, gid, None)
                fn += 1
                continue
            right = glabel == p_labels[j]
            mistaken, rule = review(aid)
            gts.append({eval_key: "tp" if right else "fn", id_key: p_ids[j], iou_key: 1.0,
                        "predicted_label": p_labels[j], "predicted_confidence": p_confs[j],
                        "mistakenness": mistaken, "rule_label": rule})
            matches.add(glabel, p_labels[j], 1.0, p_confs[j], gid, p_ids[j])
            tp, fp, fn = (tp + 1, fp, fn) if right else (tp, fp + 1, fn + 1)
        preds = []
        for pid, plabel, conf, aid in zip(p_ids, p_labels, p_confs, p_aids):
            i = gt_of.get(aid) if aid is not None else None
            if i is None:  # added by hand, on no annotation: unmatched, as FiftyOne counts a box without truth
                preds.append({eval_key: "fp", id_key: "", iou_key: None})
                matches.add(None, plabel, None, conf, None, pid)
                fp += 1
            else:
                preds.append({eval_key: "tp" if g_labels[i] == plabel else "fp", id_key: g_ids[i], iou_key: 1.0,
                              "mistakenness": review(aid)[0]})
        gt_out.append(gts)
        pred_out.append(preds)
        for key, n in zip(counts, (tp, fp, fn)):
            counts[key].append(n)
    return Attributes(gt_out, pred_out, counts)


def evaluate(ds, view, field: str, eval_key: str, values: RoiValues, raw: bool, more: Optional[Extras] = None):
    """Register `eval_key` on `view` (replacing a previous run) and write its fields, BATCH samples at a time;
    returns the results."""
    more = more or Extras()
    import fiftyone as fo
    from fiftyone.utils.eval.coco import COCOEvaluationConfig

    if eval_key in ds.list_evaluations():
        ds.delete_evaluation(eval_key)
    config = COCOEvaluationConfig(field, "ground_truth", iou=0.5, classwise=False)  # what the matching means
    method = config.build()
    method.register_run(view, eval_key)
    method.register_samples(view, eval_key)
    for attr, ftype in (("predicted_label", fo.StringField), ("predicted_confidence", fo.FloatField),
                        ("mistakenness", fo.FloatField), ("rule_label", fo.StringField)):
        if not ds.has_sample_field(f"ground_truth.detections.{attr}"):
            ds.add_sample_field(f"ground_truth.detections.{attr}", ftype)
    if not ds.has_sample_field(f"{field}.detections.mistakenness"):
        ds.add_sample_field(f"{field}.detections.mistakenness", fo.FloatField)
    matches = Matches()
    for batch in batches(view.values("id")):
        batch_view = ds.select(batch, ordered=True)
        attrs = attributes(read_labels(batch_view, field), eval_key, values, matches)
        if raw:
            _write_raw(ds, batch, field, attrs)
        else:
            _write_public(batch_view, field, attrs)
    ds.reload()
    results = results_of(method, view, eval_key, matches)
    results.custom_metrics = {CUSTOM_METRIC + key: {"key": key, "value": value, "label": label,
                                                    "lower_is_better": lower}
                              for key, (label, value, lower) in more.summary.items()}
    method.save_run_results(view, eval_key, results)
    method.add_fields_to_sidebar_group(view, eval_key, omit_fields=(field, "ground_truth"))
    return results


def results_of(method, view, eval_key: str, matches: Matches):
    """What `method.generate_results(view, matches, eval_key, classes)` returns, built from the columns: the results
    are made without matches, then given their arrays (fiftyone 1.22.1's DetectionResults attributes, which
    `_parse_labels` would fill: a missing label becomes `missing`), so 2M matches never become 2M tuples.
    tests/test_fiftyone_review.py compares the two."""
    import numpy as np

    classes = matches.classes()
    results = method.generate_results(view, [], eval_key=eval_key, classes=classes)
    gt, pred, ious, confs, gt_ids, pred_ids = matches.columns
    missing = results.missing
    results.ytrue = np.asarray([missing if n is None else n for n in gt], dtype=object)
    results.ypred = np.asarray([missing if n is None else n for n in pred], dtype=object)
    results.ious = np.asarray(ious, dtype=object if any(v is None for v in ious) else float)
    results.confs = np.asarray(confs, dtype=object if any(v is None for v in confs) else float)
    results.ytrue_ids = np.asarray(gt_ids, dtype=object)
    results.ypred_ids = np.asarray(pred_ids, dtype=object)
    return results


def _write_public(view, field: str, attrs: Attributes) -> None:
    """One `set_values` per attribute (works through an Enterprise API connection)."""
    for path, per_sample in (("ground_truth", attrs.gt), (field, attrs.pred)):
        names = sorted({k for sample in per_sample for d in sample for k in d})
        for name in names:
            view.set_values(f"{path}.detections.{name}", [[d.get(name) for d in sample] for sample in per_sample])
    for name, values in attrs.counts.items():
        view.set_values(name, values)


def _write_raw(ds, sample_ids: List[str], field: str, attrs: Attributes) -> None:
    """The same values in one unordered pymongo bulk write a batch (open-source FiftyOne, direct MongoDB)."""
    from datetime import datetime, timezone

    from bson import ObjectId
    from pymongo import UpdateOne

    ids = [ObjectId(s) for s in sample_ids]
    # private API (fiftyone 1.22.1): the dataset's sample collection, as fiftyone_io._write_raw uses it;
    # tests compare this path's documents with the public one's
    collection = ds._sample_collection
    stored = {d["_id"]: d for d in collection.find({"_id": {"$in": ids}}, {"ground_truth": 1, field: 1})}
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    ops = []
    for k, sid in enumerate(ids):
        doc = stored[sid]
        update: Dict[str, Any] = {name: values[k] for name, values in attrs.counts.items()}
        for path, per_sample in (("ground_truth", attrs.gt), (field, attrs.pred)):
            container = doc.get(path)
            if not container:
                continue
            for det, values in zip(container.get("detections") or [], per_sample[k]):
                det.update(values)
            update[path] = container
        update["last_modified_at"] = now
        ops.append(UpdateOne({"_id": sid}, {"$set": update}))
    if ops:
        collection.bulk_write(ops, ordered=False)
