"""Scores for one split's predictions: the per-ROI table, the metrics, per-class results, confusions.

With labels: the competition score (mean hierarchical distance, a missing prediction counted as 12)
beside the model's own score over the ROIs it predicted and the coverage (which ROIs were not
predicted, and why, from the infer stage's OUT.skipped.csv), accuracy overall and per rank,
per-class precision/recall/F1, and per ROI the mistakenness of its ground truth (FiftyOne Brain's
definition). Without labels (the official test split) no score exists: only coverage and counts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from fathompipe.annotations import Coco
from fathompipe.evaluation import decision
from fathompipe.evaluation.metric import MAX_DISTANCE, distances
from fathompipe.layout import OutputFiles
from fathompipe.evaluation.taxonomy import RANKS, load_taxonomy, taxonomic_order

NOT_IN_FILE = "no prediction in the predictions file"


def load_predictions(path: str | Path) -> pd.DataFrame:
    """annotation_id (index), concept_name and, from the parquet, confidence, top-5 and logits
    (confidence NaN for a CSV). `attrs["skipped"]` maps each ROI the infer stage skipped to its reason,
    read from the OUT.skipped.csv beside the predictions when there is one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"predictions {path} do not exist (run the infer stage first)")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype={"annotation_id": "int64", "concept_name": "string"}, keep_default_na=False)
        if list(df.columns[:2]) != ["annotation_id", "concept_name"]:
            raise ValueError(f"{path}: expected columns annotation_id,concept_name, got {list(df.columns)}")
    if df["annotation_id"].duplicated().any():
        dup = int(df["annotation_id"][df["annotation_id"].duplicated()].iloc[0])
        raise ValueError(f"{path}: annotation_id {dup} appears more than once")
    if "confidence" not in df:
        df["confidence"] = np.nan
    df = df.set_index("annotation_id")
    df.attrs["skipped"] = load_skipped(OutputFiles(path.with_suffix(".csv")).skipped)
    return df


def load_skipped(path: Path) -> Dict[int, str]:
    """annotation_id -> reason from an OUT.skipped.csv; empty when there is none."""
    if not path.exists():
        return {}
    table = pd.read_csv(path, dtype={"annotation_id": "int64", "reason": "string"}, keep_default_na=False)
    if list(table.columns) != ["annotation_id", "image_id", "reason"]:
        raise ValueError(f"{path}: expected columns annotation_id,image_id,reason, got {list(table.columns)}")
    return dict(zip(table["annotation_id"].tolist(), table["reason"].tolist()))


def mistakenness(logits: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """FiftyOne Brain's classification mistakenness with logits, per row: (m * exp(-H(softmax)) + 1) / 2,
    m = +1 where the prediction disagrees with the label, -1 where it agrees. A confident disagreement
    scores near 1 (likely a label error), a confident agreement near 0, an uncertain model near 0.5."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return (np.where(correct, -1.0, 1.0) * np.exp(-entropy) + 1.0) / 2.0


def mistakenness_from_confidence(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """The Brain's fallback without logits: (m * confidence + 1) / 2."""
    return (np.where(correct, -1.0, 1.0) * np.asarray(confidence, np.float64) + 1.0) / 2.0


@dataclass
class Evaluation:
    metrics: Dict[str, object]
    # one row per annotation: annotation_id, image_id, bbox, truth, prediction, confidence, not_predicted
    # (the reason, '' when predicted) and, with labels, distance, correct and mistakenness
    table: pd.DataFrame


def score(dataset: Coco, predictions: pd.DataFrame) -> Evaluation:
    taxonomy = load_taxonomy()
    anns = dataset.annotations
    ids = anns.id.tolist()
    pred = predictions["concept_name"].reindex(ids)
    skipped: Dict[int, str] = predictions.attrs.get("skipped", {})
    table = pd.DataFrame({
        "annotation_id": ids, "image_id": anns.image_id.tolist(), "bbox": list(map(tuple, anns.bbox.tolist())),
        "truth": dataset.labels().tolist(),
        "prediction": [None if p is None or pd.isna(p) else str(p) for p in pred.tolist()],
        "confidence": predictions["confidence"].reindex(ids).astype(float).to_numpy()})
    predicted = table["prediction"].notna()
    table["not_predicted"] = ["" if ok else skipped.get(a, NOT_IN_FILE) for a, ok in zip(ids, predicted)]
    known = table["prediction"].isin(list(taxonomy))
    n = len(table)
    metrics: Dict[str, object] = {
        "n_annotations": n,
        "n_predictions": int(predicted.sum()),
        "n_missing_predictions": int((~predicted).sum()),
        "coverage": float(predicted.mean()) if n else 0.0,
        "not_predicted": dict(Counter(r.split(":")[0] for r in table.loc[~predicted, "not_predicted"]).most_common()),
        "n_unknown_names": int((predicted & ~known).sum()),
        "n_extra_predictions": int(len(set(predictions.index) - set(ids))),
        "labelled": bool(table["truth"].notna().all()) and n > 0,
    }
    metrics["prediction_counts"] = dict(Counter(table.loc[predicted, "prediction"]).most_common())
    if not metrics["labelled"]:
        metrics["note"] = ("no score can be computed: this split has no labels (category_id is null); "
                           "the report shows the distribution of predictions instead")
        beside_argmax(table, predictions, dataset, metrics)
        return Evaluation(metrics, table)

    table["distance"] = distances(table["truth"].tolist(), table["prediction"].tolist())
    table["correct"] = table["truth"] == table["prediction"]
    table["mistakenness"], metrics["mistakenness_from"] = _mistakenness(table, predictions)
    metrics["mean_hierarchical_distance"] = float(table["distance"].mean())
    metrics["accuracy"] = float(table["correct"].mean())
    on_predicted = table[predicted]
    metrics["predicted_only"] = {
        "n": len(on_predicted),
        "mean_hierarchical_distance": float(on_predicted["distance"].mean()) if len(on_predicted) else None,
        "accuracy": float(on_predicted["correct"].mean()) if len(on_predicted) else None}
    metrics["distance_histogram"] = {str(d): int((table["distance"] == d).sum()) for d in range(MAX_DISTANCE + 1)}
    per_rank = {}
    for rank in RANKS[1:]:  # is the predicted taxon's slot at this rank filled and equal to the truth's?
        slot = {name: taxon.at(rank) for name, taxon in taxonomy.items()}
        truth_slot = table["truth"].map(slot)
        has = truth_slot != ""
        hits = (truth_slot == table["prediction"].map(slot))[has]
        per_rank[rank] = {"accuracy": float(hits.mean()) if len(hits) else None, "n": int(has.sum())}
    metrics["accuracy_per_rank"] = per_rank
    metrics["per_class"] = per_class(table).set_index("name").to_dict(orient="index")
    wrong = table[predicted & ~table["correct"]]
    metrics["n_disagreements"] = len(wrong)
    metrics["n_disagreements_mistakenness_over_0.9"] = int((wrong["mistakenness"] > 0.9).sum())
    if beside_argmax(table, predictions, dataset, metrics):
        metrics["per_class"] = per_class(table).set_index("name").to_dict(orient="index")
    return Evaluation(metrics, table)


def _mistakenness(table: pd.DataFrame, predictions: pd.DataFrame) -> Tuple[np.ndarray, Optional[str]]:
    """Per ROI from the logits where the predictions have them, else from the confidence; NaN for a ROI
    without a prediction (the Brain would say 1.0: here that would only flag images that failed to download)."""
    out = np.full(len(table), np.nan)
    has = table["prediction"].notna().to_numpy()
    if not has.any():
        return out, None
    ids = table.loc[has, "annotation_id"]
    correct = table.loc[has, "correct"].to_numpy()
    if "logits" in predictions:
        logits = predictions["logits"].reindex(ids)
        if logits.map(lambda v: v is not None and len(v) > 0).all():
            out[has] = mistakenness(np.stack(logits.to_numpy()), correct)
            return out, "logits"
    confidence = table.loc[has, "confidence"].to_numpy()
    if np.isnan(confidence).any():
        return out, None
    out[has] = mistakenness_from_confidence(confidence, correct)
    return out, "confidence"


def per_class(table: pd.DataFrame) -> pd.DataFrame:
    """Precision, recall, F1 (0 where undefined), support and mean distance per class, in taxonomic order.
    A ROI without a prediction counts against its class's recall."""
    names = taxonomic_order()
    support = table["truth"].value_counts().reindex(names, fill_value=0).to_numpy()
    predicted = table["prediction"].value_counts().reindex(names, fill_value=0).to_numpy()
    hits = table.loc[table["correct"], "truth"].value_counts().reindex(names, fill_value=0).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        recall = np.where(support > 0, hits / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    mean_distance = table.groupby("truth")["distance"].mean()
    out = pd.DataFrame({"name": names, "precision": precision, "recall": recall, "f1": f1, "support": support,
                        "mean_distance": [float(mean_distance.get(n, np.nan)) for n in names]})
    if "rule_distance" in table:  # the expected-distance rule beside argmax, over the same ROIs
        rule = table.groupby("truth")["rule_distance"].mean()
        out["mean_distance_rule"] = [float(rule.get(n, np.nan)) for n in names]
    return out


N_CHANGES = 20  # the most frequent (argmax, rule) substitutions kept in metrics.json


def beside_argmax(table: pd.DataFrame, predictions: pd.DataFrame, dataset: Coco,
                  metrics: Dict[str, object]) -> bool:
    """The expected-distance rule (decision.py) from the saved logits, beside argmax. Adds per ROI
    `rule_prediction`, `expected_distance` (E(argmax) under its softmax), `rule_expected_distance` and, with
    labels, `rule_distance` (12 without a prediction, as `distance`), and metrics["expected_distance_rule"].
    False (nothing added) without logits. The logits' columns are the categories in id order (the model's)."""
    has = table["prediction"].notna().to_numpy()
    if "logits" not in predictions or not has.any():
        return False
    names = dataset.class_names()
    column = predictions["logits"].reindex(table.loc[has, "annotation_id"]).to_numpy()
    if any(v is None for v in column):  # logits for only some ROIs: no rule (as mistakenness falls back)
        return False
    wrong = next((k for k, v in enumerate(column) if len(v) != len(names)), None)
    if wrong is not None:
        raise ValueError(f"predictions: annotation {table.loc[has, 'annotation_id'].iloc[wrong]} has "
                         f"{len(column[wrong])} logits, but {dataset.path} has {len(names)} categories")
    rows = decision.CHUNK_ROWS
    made = decision.decide((np.stack(column[i:i + rows]).astype(np.float32, copy=False)
                            for i in range(0, len(column), rows)), names)
    argmax = np.asarray(names, dtype=object)[made.argmax]
    stated = table.loc[has, "prediction"].to_numpy()
    for k in np.flatnonzero(argmax != stated):  # a tie between two logits may name either; anything else is wrong
        if stated[k] not in names or column[k][names.index(stated[k])] < np.max(column[k]):
            raise ValueError(f"{dataset.path}: annotation {table.loc[has, 'annotation_id'].iloc[k]}: its logits put "
                             f"{argmax[k]!r} first but its concept_name is {stated[k]!r}: the logits' columns are not "
                             f"this file's categories in id order")
    rule_names = np.asarray(names, dtype=object)[made.rule]
    table["rule_prediction"] = None
    table.loc[has, "rule_prediction"] = rule_names
    for name, values in (("expected_distance", made.expected_argmax), ("rule_expected_distance", made.expected_rule)):
        table[name] = np.nan
        table.loc[has, name] = values.astype(np.float64)
    out: Dict[str, object] = {
        "n": int(has.sum()), "n_differ": int(made.differs.sum()),
        "expected_distance_argmax": float(made.expected_argmax.astype(np.float64).mean()),
        "expected_distance_rule": float(made.expected_rule.astype(np.float64).mean())}
    if metrics.get("labelled"):
        d = decision.distance_matrix(names)
        index = {n: i for i, n in enumerate(names)}
        truth = table.loc[has, "truth"].map(index).to_numpy(np.int64)
        rule_distance = np.full(len(table), float(MAX_DISTANCE))
        rule_distance[has] = d[truth, made.rule]
        table["rule_distance"] = rule_distance.astype(np.int64)
        argmax_distance = table.loc[has, "distance"].to_numpy()
        changed = table[has][made.differs].assign(rule_distance=rule_distance[has][made.differs])
        changes = changed.groupby(["prediction", "rule_prediction"]).agg(
            n=("annotation_id", "size"), mean_distance_argmax=("distance", "mean"),
            mean_distance_rule=("rule_distance", "mean")).reset_index().sort_values("n", ascending=False, kind="stable")
        out.update({
            "mean_hierarchical_distance_argmax": float(argmax_distance.mean()),
            "mean_hierarchical_distance_rule": float(rule_distance[has].mean()),
            "accuracy_argmax": float((truth == made.argmax).mean()),
            "accuracy_rule": float((truth == made.rule).mean()),
            "competition_score_rule": float(rule_distance.mean()),
            "n_better": int((rule_distance[has] < argmax_distance).sum()),
            "n_worse": int((rule_distance[has] > argmax_distance).sum()),
            "changes": changes.head(N_CHANGES).rename(columns={"prediction": "argmax", "rule_prediction": "rule"})
                              .to_dict(orient="records")})
    metrics["expected_distance_rule"] = out
    return True


def confusions(table: pd.DataFrame) -> pd.DataFrame:
    wrong = table[~table["correct"]]
    pairs = wrong.groupby(["truth", "prediction"], dropna=False).agg(
        count=("annotation_id", "size"), distance=("distance", "first")).reset_index()
    return pairs.sort_values(["count", "distance"], ascending=[False, False]).reset_index(drop=True)


def confusion_matrix(table: pd.DataFrame) -> Tuple[List[str], np.ndarray]:
    """(names in taxonomic order, counts[true, predicted]) over the ROIs predicted with a known name."""
    names = taxonomic_order()
    index = {n: i for i, n in enumerate(names)}
    cm = np.zeros((len(names), len(names)), np.int64)
    rows = table["truth"].map(index)
    cols = table["prediction"].map(index)
    ok = rows.notna() & cols.notna()
    np.add.at(cm, (rows[ok].astype(int).to_numpy(), cols[ok].astype(int).to_numpy()), 1)
    return names, cm


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
