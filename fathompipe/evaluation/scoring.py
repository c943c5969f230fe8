"""Scores for one split's predictions: the per-ROI table, the metrics, per-class results, confusions, the matrix.

With labels: the competition score (mean hierarchical distance, a missing prediction counted as 12)
beside the model's own score over the ROIs it predicted and the coverage (which ROIs were not
predicted, and why, from the infer stage's OUT.skipped.csv), accuracy overall and per rank,
per-class precision/recall/F1, per ROI the mistakenness of its ground truth (FiftyOne Brain's
definition) and what the expected-distance rule (decision.py) would answer beside argmax. Without
labels (the official test split) no score exists: only coverage, counts and the rule's answers.

Sized for 2,000,000 ROIs: names become class indices once, every score is an array operation over them,
and the logits are read from the parquet in chunks (mistakenness and the rule in one pass), so the only
per-ROI state is the table's small columns: ids, names shared between rows, floats (about 90 bytes a ROI,
180 MB at 2M). The report's tables are computed here once; report.py only renders them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from fathompipe.annotations import Coco
from fathompipe.evaluation import decision
from fathompipe.evaluation.metric import MAX_DISTANCE
from fathompipe.evaluation.taxonomy import RANKS, load_taxonomy, taxonomic_order
from fathompipe.predictions import NOT_IN_FILE, Predictions

N_CHANGES = 20  # the most frequent (argmax, rule) substitutions kept in metrics.json


def mistakenness(logits: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """FiftyOne Brain's classification mistakenness with logits, per row: (m * exp(-H(softmax)) + 1) / 2,
    m = +1 where the prediction disagrees with the label, -1 where it agrees. A confident disagreement
    scores near 1 (likely a label error), a confident agreement near 0, an uncertain model near 0.5."""
    p = decision.softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return (np.where(correct, -1.0, 1.0) * np.exp(-entropy) + 1.0) / 2.0


def mistakenness_from_confidence(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """The Brain's fallback without logits: (m * confidence + 1) / 2."""
    return (np.where(correct, -1.0, 1.0) * np.asarray(confidence, np.float64) + 1.0) / 2.0


@dataclass
class Evaluation:
    metrics: Dict[str, object]
    # one row per annotation, in the annotation file's order: annotation_id, image_id, truth, prediction,
    # confidence, not_predicted (the reason, '' when predicted); with labels distance, correct, mistakenness;
    # with logits rule_prediction, expected_distance, rule_expected_distance (and rule_distance with labels)
    table: pd.DataFrame
    per_class: Optional[pd.DataFrame] = None  # labelled splits: one row per class, taxonomic order
    confusions: Optional[pd.DataFrame] = None  # labelled splits: (truth, prediction) pairs that differ, by count
    matrix: Optional[Tuple[List[str], np.ndarray]] = None  # labelled: names (taxonomic order), counts[true, pred]


def score(dataset: Coco, predictions: Predictions) -> Evaluation:
    names = dataset.class_names()  # the model's classes: the logits' columns
    index = {n: i for i, n in enumerate(names)}
    anns = dataset.annotations
    n = len(anns)
    at = predictions.rows_of(anns.id)
    has = at >= 0
    prediction = np.full(n, None, object)
    prediction[has] = predictions.concept_name[at[has]]
    confidence = np.full(n, np.nan)
    confidence[has] = predictions.confidence[at[has]]
    not_predicted = np.full(n, "", object)
    for row in np.flatnonzero(~has):
        not_predicted[row] = predictions.skipped.get(int(anns.id[row]), NOT_IN_FILE)
    truth = dataset.labels()
    table = pd.DataFrame({"annotation_id": anns.id, "image_id": anns.image_id, "truth": truth,
                          "prediction": prediction, "confidence": confidence, "not_predicted": not_predicted})
    predicted_index = _indices(prediction, index)
    known = predicted_index >= 0
    metrics: Dict[str, object] = {
        "n_annotations": n,
        "n_predictions": int(has.sum()),
        "n_missing_predictions": int((~has).sum()),
        "coverage": float(has.mean()) if n else 0.0,
        "not_predicted": dict(Counter(r.split(":")[0] for r in not_predicted[~has]).most_common()),
        "n_unknown_names": int((has & ~known).sum()),
        "n_extra_predictions": len(predictions) - int(has.sum()),
        "labelled": bool(n) and not any(t is None for t in truth),
    }
    metrics["prediction_counts"] = dict(Counter(prediction[has]).most_common())
    roi_of = np.full(len(predictions), -1, np.int64)  # the table row of each prediction (-1: not this file's)
    roi_of[at[has]] = np.flatnonzero(has)
    if not metrics["labelled"]:
        metrics["note"] = ("no score can be computed: this split has no labels (category_id is null); "
                           "the report shows the distribution of predictions instead")
        if predictions.n_logits and has.any():
            _from_logits(table, predictions, roi_of, names, predicted_index, None, metrics)
        return Evaluation(metrics, table)

    true_index = _indices(truth, index)
    if (true_index < 0).any():
        row = int(np.flatnonzero(true_index < 0)[0])
        raise ValueError(f"{dataset.path}: annotation {int(anns.id[row])} has the label {truth[row]!r}, which is not "
                         f"one of the {len(names)} categories the model predicts")
    d = decision.distance_matrix(names).astype(np.int64)
    distance = np.where(known, d[true_index, predicted_index.clip(0)], MAX_DISTANCE)
    correct = known & (true_index == predicted_index)
    table["distance"] = distance
    table["correct"] = correct
    if predictions.n_logits and has.any():
        _from_logits(table, predictions, roi_of, names, predicted_index, true_index, metrics)
    elif has.any() and not np.isnan(confidence[has]).any():
        table["mistakenness"] = np.where(has, mistakenness_from_confidence(confidence, correct), np.nan)
        metrics["mistakenness_from"] = "confidence"
    else:
        table["mistakenness"] = np.nan
        metrics["mistakenness_from"] = None
    metrics["mean_hierarchical_distance"] = float(distance.mean())
    metrics["accuracy"] = float(correct.mean())
    k = int(has.sum())
    metrics["predicted_only"] = {"n": k,
                                 "mean_hierarchical_distance": float(distance[has].mean()) if k else None,
                                 "accuracy": float(correct[has].mean()) if k else None}
    metrics["distance_histogram"] = {str(v): int(c) for v, c in
                                     enumerate(np.bincount(distance, minlength=MAX_DISTANCE + 1))}
    metrics["accuracy_per_rank"] = _per_rank(names, true_index, predicted_index)
    wrong = has & ~correct
    metrics["n_disagreements"] = int(wrong.sum())
    metrics["n_disagreements_mistakenness_over_0.9"] = int((table["mistakenness"].to_numpy()[wrong] > 0.9).sum())
    classes = per_class(names, true_index, predicted_index, distance,
                        table["rule_distance"].to_numpy() if "rule_distance" in table else None)
    metrics["per_class"] = classes.set_index("name").to_dict(orient="index")
    order = taxonomic_order()
    position = np.asarray([order.index(name) for name in names])
    cm = np.bincount(position[true_index[known]] * len(order) + position[predicted_index[known]],
                     minlength=len(order) ** 2).reshape(len(order), len(order))
    return Evaluation(metrics, table, classes, _confusions(table[~correct]), (order, cm))


def _indices(values: np.ndarray, index: Dict[str, int]) -> np.ndarray:
    """The class index of each name; -1 for None or a name outside the classes."""
    return pd.Series(values, dtype=object).map(index).fillna(-1).to_numpy(np.int64)


def _from_logits(table: pd.DataFrame, predictions: Predictions, roi_of: np.ndarray, names: List[str],
                 predicted_index: np.ndarray, true_index: Optional[np.ndarray], metrics: Dict[str, object]) -> None:
    """One pass over the logits, in chunks: mistakenness (labelled splits) and the expected-distance rule beside
    argmax (decision.py). The logits' columns must be `names` (the categories in id order): a logits argmax that is
    neither the stated prediction nor tied with it stops the stage."""
    n = len(table)
    d = decision.distance_matrix(names)
    rule = np.full(n, -1, np.int64)
    argmax = np.full(n, -1, np.int64)
    expected, expected_rule, mistaken = (np.full(n, np.nan) for _ in range(3))
    correct = table["correct"].to_numpy() if true_index is not None else None
    for rows, logits in predictions.logit_chunks():
        rois = roi_of[rows]
        keep = rois >= 0
        rois, logits = rois[keep], logits[keep]
        if not len(rois):
            continue
        if logits.shape[1] != len(names):
            raise ValueError(f"{predictions.path}: {logits.shape[1]} logits per ROI, but the annotation file has "
                             f"{len(names)} categories")
        made = decision.decide_chunk(logits, d)
        stated = predicted_index[rois]
        tied = (stated >= 0) & (logits[np.arange(len(rois)), stated.clip(0)] >= logits.max(axis=1))
        bad = np.flatnonzero((made.argmax != stated) & ~tied)
        if len(bad):
            row = rois[bad[0]]
            raise ValueError(f"{predictions.path}: annotation {int(table['annotation_id'].iat[row])}: its logits put "
                             f"{names[made.argmax[bad[0]]]!r} first but its concept_name is "
                             f"{table['prediction'].iat[row]!r}: the logits' columns are not this file's categories "
                             f"in id order")
        rule[rois], argmax[rois] = made.rule, made.argmax
        expected[rois], expected_rule[rois] = made.expected_argmax, made.expected_rule
        if correct is not None:
            mistaken[rois] = mistakenness(logits, correct[rois])
    has = rule >= 0
    labels = np.asarray(names + [None], dtype=object)
    table["rule_prediction"] = labels[np.where(has, rule, len(names))]
    table["expected_distance"], table["rule_expected_distance"] = expected, expected_rule
    out: Dict[str, object] = {"n": int(has.sum()), "n_differ": int((rule != argmax)[has].sum()),
                              "expected_distance_argmax": float(expected[has].mean()),
                              "expected_distance_rule": float(expected_rule[has].mean())}
    if true_index is not None:
        table["mistakenness"] = mistaken
        metrics["mistakenness_from"] = "logits"
        rule_distance = np.where(has, d[true_index, rule.clip(0)], MAX_DISTANCE).astype(np.int64)
        table["rule_distance"] = rule_distance
        argmax_distance = table["distance"].to_numpy()[has]
        differs = has & (rule != argmax)
        changes = table[differs].groupby(["prediction", "rule_prediction"]).agg(
            n=("annotation_id", "size"), mean_distance_argmax=("distance", "mean"),
            mean_distance_rule=("rule_distance", "mean")).reset_index().sort_values("n", ascending=False, kind="stable")
        out.update({
            "mean_hierarchical_distance_argmax": float(argmax_distance.mean()),
            "mean_hierarchical_distance_rule": float(rule_distance[has].mean()),
            "accuracy_argmax": float((true_index == argmax)[has].mean()),
            "accuracy_rule": float((true_index == rule)[has].mean()),
            "competition_score_rule": float(rule_distance.mean()),
            "n_better": int((rule_distance[has] < argmax_distance).sum()),
            "n_worse": int((rule_distance[has] > argmax_distance).sum()),
            "changes": changes.head(N_CHANGES).rename(columns={"prediction": "argmax", "rule_prediction": "rule"})
                              .to_dict(orient="records")})
    metrics["expected_distance_rule"] = out


def _per_rank(names: List[str], true_index: np.ndarray, predicted_index: np.ndarray) -> Dict[str, Dict[str, object]]:
    """Per rank below kingdom: is the predicted taxon's slot at this rank filled and equal to the truth's?"""
    taxonomy = load_taxonomy()
    out: Dict[str, Dict[str, object]] = {}
    for rank in RANKS[1:]:
        slot = np.asarray([taxonomy[name].at(rank) for name in names] + [None], dtype=object)
        truth_slot = slot[true_index]
        has = truth_slot != ""
        hits = (truth_slot == slot[np.where(predicted_index >= 0, predicted_index, len(names))])[has]
        out[rank] = {"accuracy": float(hits.mean()) if len(hits) else None, "n": int(has.sum())}
    return out


def per_class(names: List[str], true_index: np.ndarray, predicted_index: np.ndarray, distance: np.ndarray,
              rule_distance: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Precision, recall, F1 (0 where undefined), support and mean distance per class of `names`, in taxonomic order
    (and the expected-distance rule's mean distance, given its distances). Indices into `names`; -1: no prediction,
    or a name outside them, which counts against its class's recall."""
    k = len(names)
    correct = (true_index == predicted_index) & (predicted_index >= 0)
    support = np.bincount(true_index, minlength=k)
    predicted = np.bincount(predicted_index[predicted_index >= 0], minlength=k)
    hits = np.bincount(true_index[correct], minlength=k)

    def mean_by_class(values: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(support > 0, np.bincount(true_index, weights=values, minlength=k) / support, np.nan)

    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        recall = np.where(support > 0, hits / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    out = pd.DataFrame({"name": names, "precision": precision, "recall": recall, "f1": f1, "support": support,
                        "mean_distance": mean_by_class(np.asarray(distance, np.float64))})
    if rule_distance is not None:
        out["mean_distance_rule"] = mean_by_class(np.asarray(rule_distance, np.float64))
    position = {name: i for i, name in enumerate(taxonomic_order())}
    return out.sort_values("name", key=lambda s: s.map(position), kind="stable").reset_index(drop=True)


def _confusions(wrong: pd.DataFrame) -> pd.DataFrame:
    """(truth, prediction) pairs of the ROIs not predicted right (no prediction: an empty prediction), by count."""
    pairs = wrong.groupby(["truth", "prediction"], dropna=False).agg(
        count=("annotation_id", "size"), distance=("distance", "first")).reset_index()
    return pairs.sort_values(["count", "distance"], ascending=[False, False]).reset_index(drop=True)


def headline(metrics: Dict[str, object]) -> str:
    """One line: the model's score over what it predicted, its coverage, and the competition-rule score."""
    n, k = metrics["n_annotations"], metrics["n_predictions"]
    missing = metrics["n_missing_predictions"]
    assert isinstance(n, int) and isinstance(k, int) and isinstance(missing, int)
    why = metrics["not_predicted"]
    assert isinstance(why, dict)
    coverage = (f"{k:,} of {n:,} ROIs predicted ({100 * k / max(n, 1):.1f}%)"
                + (f"; {missing:,} not: " + ", ".join(f"{c:,} {r}" for r, c in why.items()) if missing else ""))
    if not metrics.get("labelled"):
        return f"{coverage}; {metrics['note']}"
    own = metrics["predicted_only"]
    assert isinstance(own, dict)
    if own["n"] == 0:
        return f"{coverage}; competition rule (missing = 12): {metrics['mean_hierarchical_distance']:.3f}"
    return (f"mean hierarchical distance {own['mean_hierarchical_distance']:.3f}, accuracy {own['accuracy']:.3f} "
            f"over the ROIs predicted; {coverage}; competition rule (a missing prediction scores 12): "
            f"{metrics['mean_hierarchical_distance']:.3f}")
