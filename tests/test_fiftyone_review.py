"""The label-review workflow in the App (issue 13): the stage's evaluation equals FiftyOne's own
`evaluate_detections`, review views carry truth beside prediction, tags set on their patches survive a
rerun, mistakenness equals scoring.py's, the winner's embeddings become a Brain visualization (the App
command: tests/test_app.py). Researchers' schema (tests/researchers_dataset.py), private mongod."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Set

import numpy as np
import pandas as pd
import pytest

from conftest import DATA
from fathompipe.annotations import load_coco
from fathompipe.config import EvaluateConfig
from fathompipe.evaluate import run
from fathompipe.evaluation import fiftyone_io
from fathompipe.evaluation.scoring import score
from fathompipe.jobs import EvaluateSplit
from fathompipe.layout import OutputFiles
from fathompipe.predictions import read_predictions
from researchers_dataset import ingest_like_researchers, model_like_predictions, retag_val, train_like_subset

TEST_JSON = DATA / "dataset_test.json"
N_TRAIN_IMAGES = 200


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("review")
    train = train_like_subset(d, N_TRAIN_IMAGES)
    preds = model_like_predictions(train, d / "predictions.parquet", seed=3)
    # embeddings in the format of an earlier version (still read): one vector per predicted ROI, near its class
    rng = np.random.default_rng(0)
    centres = {name: rng.normal(0, 1, 64) for name in preds["concept_name"].unique()}
    vectors = np.stack([centres[n] + rng.normal(0, 0.3, 64) for n in preds["concept_name"]]).astype(np.float32)
    order = np.argsort(preds["annotation_id"].to_numpy())
    np.savez(OutputFiles(d / "predictions.csv").legacy_embeddings,
             annotation_id=preds["annotation_id"].to_numpy()[order], embeddings=vectors[order])
    # the same ROIs with the model's logits (argmax: the prediction), for the expected-distance rule
    names = [c["name"] for c in sorted(json.loads(train.read_text())["categories"], key=lambda c: c["id"])]
    logits = rng.normal(0, 1, (len(preds), len(names))).astype(np.float32)
    runner_up = rng.integers(0, len(names), len(preds))
    logits[np.arange(len(preds)), runner_up] += 2.5
    logits[np.arange(len(preds)), [names.index(n) for n in preds["concept_name"]]] = (
        logits.max(axis=1) + rng.uniform(0.1, 3, len(preds)))  # the prediction is the argmax, by a margin
    preds.assign(logits=list(logits)).to_parquet(d / "with-logits.parquet")
    return {"train": train, "predictions": d / "predictions.parquet", "with_logits": d / "with-logits.parquet"}


def stage(inputs, out: Path, name: str) -> dict:
    return run(EvaluateSplit(str(inputs["train"]), str(inputs["predictions"]), str(out), "train", "/unused"),
               EvaluateConfig(dataset=name))


def test_evaluation_equals_evaluate_detections_and_sklearn(fiftyone_db, inputs, tmp_path):
    from fiftyone import ViewField as F
    from sklearn.metrics import classification_report, confusion_matrix

    ds = ingest_like_researchers("review-eval", {"train": inputs["train"], "test": TEST_JSON})
    retag_val(ds)
    stage(inputs, tmp_path / "r", ds.name)
    ds.reload()
    train = ds.match(F("split") == "train")
    # FiftyOne's own evaluation of the same pairs, as the stage ran it before
    train.evaluate_detections("model_predictions", gt_field="ground_truth", eval_key="ref", classwise=False, iou=0.5)
    ours, ref = "eval_model_train", "ref"
    for path in ("ground_truth", "model_predictions"):
        assert (train.values(f"{path}.detections.{ours}") == train.values(f"{path}.detections.{ref}"))
        assert (train.values(f"{path}.detections.{ours}_id") == train.values(f"{path}.detections.{ref}_id"))
        mine = train.values(f"{path}.detections.{ours}_iou", unwind=True)
        theirs = train.values(f"{path}.detections.{ref}_iou", unwind=True)
        assert np.allclose(np.array(mine, float), np.array(theirs, float), equal_nan=True)
    for count in ("tp", "fp", "fn"):
        assert train.values(f"{ours}_{count}") == train.values(f"{ref}_{count}")
    results, reference = ds.load_evaluation_results(ours), ds.load_evaluation_results(ref)
    def pairs(r) -> list:  # the same matches, in FiftyOne's per-prediction order or in ground-truth order
        return sorted(zip(r.ytrue, r.ypred, r.ytrue_ids, r.ypred_ids, r.confs))
    assert pairs(results) == pairs(reference)
    ours_report, their_report = results.report(), reference.report()  # classes in another order (taxonomic):
    assert ours_report.keys() == their_report.keys()  # the averages may differ in the last bit of a float
    for name, row in their_report.items():
        assert ours_report[name] == pytest.approx(row, rel=1e-12), name
    labels = sorted(set(results.ytrue) | set(results.ypred))
    truth, pred = list(results.ytrue), list(results.ypred)
    assert np.array_equal(results.confusion_matrix(classes=labels), confusion_matrix(truth, pred, labels=labels))
    report = classification_report(truth, pred, labels=labels, output_dict=True, zero_division=0)
    for name in labels:
        assert results.report()[name]["support"] == report[name]["support"]
        assert results.report()[name]["f1-score"] == pytest.approx(report[name]["f1-score"])
    assert len(ds.match(F("split") == "train").to_evaluation_patches(ours)) > 0
    assert "ref" in ds.list_evaluations()  # theirs kept


def test_raw_and_public_evaluation_writes_are_identical(fiftyone_db, inputs, tmp_path, monkeypatch):
    """Both write paths, in many small batches, store the same fields; the stored results (built from columns, not
    from one tuple per ROI) are what FiftyOne itself rebuilds from the database."""
    from fiftyone import ViewField as F

    monkeypatch.setattr(fiftyone_io, "BATCH", 7)
    raw = ingest_like_researchers("review-raw", {"train": inputs["train"]})
    stage(inputs, tmp_path / "r", raw.name)
    raw.reload()
    public = raw.clone("review-public")
    coco, preds = load_coco(inputs["train"]), read_predictions(inputs["predictions"])
    values = fiftyone_io.RoiValues.of(coco, preds, score(coco, preds).table)
    fiftyone_io.evaluate_in_app(public, "model_predictions", "train", "eval_model_train", values, raw=False)
    public.reload()
    built = public.load_evaluation_results("eval_model_train")  # the object the stage made (cached)
    rebuilt = public.load_evaluation_results("eval_model_train", cache=False)  # FiftyOne's own, from the database
    for name in ("ytrue", "ypred", "confs", "ious", "ytrue_ids", "ypred_ids", "classes"):
        assert np.asarray(getattr(built, name)).tolist() == np.asarray(getattr(rebuilt, name)).tolist(), name
    assert built.report() == rebuilt.report() and built.missing == rebuilt.missing
    for path in ("ground_truth.detections", "model_predictions.detections", "eval_model_train_tp",
                 "eval_model_train_fn"):
        a, b = raw.match(F("split") == "train").values(path), public.match(F("split") == "train").values(path)
        if path.endswith("detections"):
            a = [[{k: v for k, v in d.to_dict().items()} for d in s] for s in a]
            b = [[{k: v for k, v in d.to_dict().items()} for d in s] for s in b]
        assert a == b, path


def test_review_views_of_a_large_split_hold_their_first_rois(fiftyone_db, inputs, tmp_path, monkeypatch):
    """Above REVIEW_LIMIT ROIs a review view holds the first REVIEW_LIMIT in its own order, the same ones, in the same
    order, as the whole view begins with; the fields it filters and sorts on are indexed."""
    from fathompipe.evaluation import fiftyone_review

    ds = ingest_like_researchers("review-top", {"train": inputs["train"]})
    stage(inputs, tmp_path / "whole", ds.name)
    names = ("eval_model_train-disagreements", "eval_model_train-mistakenness", "eval_model_train-rule-differs")
    first = {}
    for name in names[:2]:
        ids = ds.load_saved_view(name).values("ground_truth.annotation_id")
        assert len(ids) > 40
        first[name] = ids[:40]
    monkeypatch.setattr(fiftyone_review, "REVIEW_LIMIT", 40)
    stage(inputs, tmp_path / "top", ds.name)
    for name, ids in first.items():
        top = ds.load_saved_view(name).values("ground_truth.annotation_id")
        assert top[:40] == ids and len(top) <= 45, name  # ties at the limit may add a few
    assert {"split", "image_id", "ground_truth.detections.annotation_id", "ground_truth.detections.mistakenness",
            "model_predictions.detections.confidence"} <= set(ds.list_indexes())


def test_review_views_of_csv_predictions_above_the_limit_are_not_empty(fiftyone_db, inputs, tmp_path, monkeypatch):
    """Predictions in the competition's CSV carry no confidence, so the views have no score to cut at: above
    REVIEW_LIMIT each still holds the ROIs of the samples chosen, never nothing."""
    from fathompipe.evaluation import fiftyone_review

    csv = tmp_path / "predictions.csv"
    pd.read_parquet(inputs["predictions"], columns=["annotation_id", "concept_name"]).to_csv(csv, index=False)
    ds = ingest_like_researchers("review-csv", {"train": inputs["train"]})
    monkeypatch.setattr(fiftyone_review, "REVIEW_LIMIT", 40)
    run(EvaluateSplit(str(inputs["train"]), str(csv), str(tmp_path / "r"), "train", "/unused"),
        EvaluateConfig(dataset=ds.name))
    rois = pd.read_csv(tmp_path / "r" / "rois.csv")
    assert rois["confidence"].isna().all()
    wrong = int((rois["truth"] != rois["prediction"]).sum())
    assert 40 <= len(ds.load_saved_view("eval_model_train-disagreements")) <= wrong
    assert 40 <= len(ds.load_saved_view("eval_model_train-mistakenness")) < len(rois)


def test_review_views_mistakenness_and_tags_that_survive_a_rerun(fiftyone_db, inputs, tmp_path):
    import fiftyone.brain as fob
    from fiftyone import ViewField as F

    ds = ingest_like_researchers("review-views", {"train": inputs["train"], "test": TEST_JSON})
    stage(inputs, tmp_path / "r1", ds.name)
    ds.reload()
    rois = pd.read_csv(tmp_path / "r1" / "rois.csv").set_index("annotation_id")
    # mistakenness in the App equals the report's (scoring.py), on the ground truth and on the prediction
    gts = ds.match(F("split") == "train").values("ground_truth.detections", unwind=True)
    exact = score(load_coco(inputs["train"]), read_predictions(inputs["predictions"])).table
    exact = dict(zip(exact["annotation_id"], exact["mistakenness"]))
    assert {d.annotation_id: d.mistakenness for d in gts} == exact
    assert all(m == pytest.approx(exact[a], rel=1e-5) for a, m in rois["mistakenness"].items())  # the report's
    preds = ds.match(F("split") == "train").values("model_predictions.detections", unwind=True)
    assert all(p.mistakenness == exact[p.annotation_id] for p in preds)

    disagreements = ds.load_saved_view("eval_model_train-disagreements")
    wrong = rois[rois["truth"] != rois["prediction"]]
    assert len(disagreements) == len(wrong) > 0
    confidences = []
    for patch in disagreements.iter_samples():
        gt, shown = patch.ground_truth, patch.model_predictions.detections
        assert len(shown) == 1 and shown[0].annotation_id == gt.annotation_id  # its own prediction, beside it
        assert shown[0].label == gt.predicted_label == wrong.loc[gt.annotation_id, "prediction"] != gt.label
        confidences.append(gt.predicted_confidence)
    assert confidences == sorted(confidences, reverse=True)
    by_mistakenness = ds.load_saved_view("eval_model_train-mistakenness")
    scores = by_mistakenness.values("ground_truth.mistakenness")
    assert len(scores) == len(rois) and scores == sorted(scores, reverse=True)
    assert ds.get_field("ground_truth.detections.mistakenness") is not None  # declared: sortable in the App

    # review in the App: tag patches through the patches API (as the App does), and one by editing a patch
    top = disagreements.limit(3)
    top.tag_labels("label_error", label_fields="ground_truth")
    tagged = set(top.values("ground_truth.annotation_id"))
    patch = disagreements.skip(5).first()
    patch.ground_truth.tags.append("reviewed")
    patch.save()
    reviewed = patch.ground_truth.annotation_id
    train = ds.match(F("split") == "train")  # and a brain run of their own that the stage must keep
    fob.compute_visualization(train, patches_field="ground_truth", method="pca", brain_key="theirs",
                              embeddings=[np.random.default_rng(1).normal(size=(len(d), 8))
                                                      for d in train.values("ground_truth.detections")], progress=False)

    def tags_on_dataset() -> Dict[int, Set[str]]:
        ds.reload()
        return {d.annotation_id: set(d.tags) for d in ds.match(F("split") == "train").values(
            "ground_truth.detections", unwind=True) if d.tags}

    before = tags_on_dataset()
    assert {a for a, t in before.items() if "label_error" in t} == tagged and "reviewed" in before[reviewed]
    first = ds.load_brain_results("eval_model_train_embeddings")
    stage(inputs, tmp_path / "r2", ds.name)  # rerun: import, evaluation, views, visualization again
    assert tags_on_dataset() == before
    assert ds.load_saved_view("eval_model_train-disagreements").count_label_tags() == \
        {"label_error": 3, "reviewed": 1}
    assert {"theirs", "eval_model_train_embeddings"} <= set(ds.list_brain_runs())
    again = ds.load_brain_results("eval_model_train_embeddings")
    assert again.points.shape == first.points.shape


def test_embeddings_visualization_of_the_winner(fiftyone_db, inputs, tmp_path):
    from fiftyone import ViewField as F

    ds = ingest_like_researchers("review-embeddings", {"train": inputs["train"]})
    info = stage(inputs, tmp_path / "r", ds.name)["fiftyone"]
    ds.reload()
    n = ds.match(F("split") == "train").count("ground_truth.detections")
    assert info["brain_key"] == "eval_model_train_embeddings" and info["visualization"] == "umap"
    assert info["embedded_rois"] == n
    results = ds.load_brain_results("eval_model_train_embeddings")
    assert results.points.shape == (n, 2) and np.isfinite(results.points).all()
    assert results.config.patches_field == "ground_truth" and results.config.method == "manual"  # our UMAP points
    # coloured by true label in the App: points of one predicted class (one cluster centre) lie together
    labels = np.array(ds.match(F("split") == "train").values("model_predictions.detections.label", unwind=True))
    spread = np.mean([results.points[labels == c].std(axis=0).mean() for c in set(labels) if (labels == c).sum() > 5])
    assert spread < results.points.std(axis=0).mean() / 2


def test_map_fitted_on_a_sample_places_every_roi_near_its_own_kind():
    """Beyond UMAP_SAMPLE ROIs the map is fitted on a sample and the rest placed by UMAP's transform: every requested
    row gets a point, in the order asked, and neighbourhoods hold as well as in the exact map (support/map_quality)."""
    from fathompipe.evaluation import fiftyone_review
    from support.map_quality import neighbour_agreement

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (6, 64))
    labels = rng.integers(0, 6, 800)
    vectors = (centres[labels] + rng.normal(0, 1, (800, 64))).astype(np.float32)
    rows = rng.permutation(800)[:600]
    agreement = {}
    for sample in (None, 200):  # the exact map, then fitted on 200 ROIs and the other 400 placed
        points, method = fiftyone_review.map_2d(vectors, rows, seed=0, sample=sample)
        assert points.shape == (600, 2) and np.isfinite(points).all()
        agreement[method] = neighbour_agreement(points, labels[rows])
    assert list(agreement)[1].endswith("the other 400 placed by its transform")
    exact, sampled = agreement.values()
    assert exact > 0.9 and sampled > exact - 0.02, agreement


def test_embeddings_map_leaves_out_rois_without_an_embedding(fiftyone_db, inputs, tmp_path):
    """ROIs the infer stage skipped (no embedding) and detections added by hand (no annotation id) get no point;
    every other point sits on its own ROI's patch."""
    import fiftyone as fo
    from fiftyone import ViewField as F

    from fathompipe.embeddings import load_embeddings
    from fathompipe.evaluation import fiftyone_review

    ds = ingest_like_researchers("review-partial", {"train": inputs["train"]})
    ids, emb = load_embeddings(OutputFiles(inputs["predictions"].with_suffix(".csv")).legacy_embeddings)
    keep = np.arange(len(ids)) % 7 != 0
    partial = tmp_path / "partial.embeddings.npz"
    np.savez(partial, annotation_id=ids[keep], embeddings=emb[keep])
    sample = ds.match(F("split") == "train").first()
    sample.ground_truth.detections.append(fo.Detection(label="Fish", bounding_box=[0.1, 0.1, 0.2, 0.2]))
    sample.save()
    view = fiftyone_io.split_view(ds, "train")
    info = fiftyone_review.visualize(ds, view, partial, "partial")
    results = ds.load_brain_results("partial")
    aid_of = {d.id: getattr(d, "annotation_id", None) for dets in view.values("ground_truth.detections") for d in dets}
    assert info["embedded_rois"] == keep.sum() == len(results.points) == len(results.label_ids)
    assert sorted(aid_of[i] for i in results.label_ids) == sorted(ids[keep].tolist())
    preds = read_predictions(inputs["predictions"])
    predicted = dict(zip(preds.annotation_id.tolist(), preds.concept_name.tolist()))
    labels = np.array([predicted[aid_of[i]] for i in results.label_ids])
    spread = np.mean([results.points[labels == c].std(axis=0).mean() for c in set(labels) if (labels == c).sum() > 5])
    assert spread < results.points.std(axis=0).mean() / 2


def test_model_evaluation_panel_reads_taxonomic_classes_confusions_and_summary_rows(fiftyone_db, inputs, tmp_path):
    """What FiftyOne's Model Evaluation panel reads from the stored results: `classes` in taxonomic order, the matrix
    with every wrong label off the diagonal (none in the "(none)" row or column), and the Summary rows the panel
    cannot derive (custom metrics) equal to metrics.json. The ROIs where the expected-distance rule answers otherwise
    are a saved view, with the rule's label on each ground-truth patch."""
    from fiftyone import ViewField as F

    from fathompipe.evaluation import fiftyone_review
    from fathompipe.evaluation.taxonomy import taxonomic_order

    ds = ingest_like_researchers("review-panel", {"train": inputs["train"]})
    run(EvaluateSplit(str(inputs["train"]), str(inputs["with_logits"]), str(tmp_path / "r"), "train", "/unused"),
        EvaluateConfig(dataset=ds.name))
    ds.reload()
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    rois = pd.read_csv(tmp_path / "r" / "rois.csv").set_index("annotation_id")
    results = ds.load_evaluation_results("eval_model_train")
    assert list(results.classes) == [n for n in taxonomic_order() if n in set(rois.truth) | set(rois.prediction)]
    matrix, labels, _ = results._confusion_matrix(include_other=False, include_missing=True)  # the panel's call
    assert labels[-1] == results.missing == "(none)" and not matrix[-1].any() and not matrix[:, -1].any()
    assert matrix.sum() - np.trace(matrix) == m["n_disagreements"] == int((rois.truth != rois.prediction).sum())
    rule = m["expected_distance_rule"]
    summary = results.metrics()  # FiftyOne's metrics() carries the custom metrics: the panel's extra Summary rows
    assert summary["mean_hierarchical_distance"] == pytest.approx(m["predicted_only"]["mean_hierarchical_distance"])
    assert summary["mean_hierarchical_distance_rule"] == pytest.approx(rule["mean_hierarchical_distance_rule"])
    assert summary["competition_score"] == pytest.approx(m["mean_hierarchical_distance"])
    assert summary["wrong_labels"] == m["n_disagreements"] and summary["not_predicted"] == 0
    fp = sum(ds.match(F("split") == "train").values("eval_model_train_fp"))
    assert summary["wrong_labels"] == fp  # the per-sample FP count of the stored fields

    differs = ds.load_saved_view("eval_model_train-rule-differs")
    assert len(differs) == rule["n_differ"] > 0
    for gt in differs.values("ground_truth"):
        assert gt.rule_label == rois.loc[gt.annotation_id, "rule_prediction"] != gt.predicted_label
    assert differs.values("ground_truth.predicted_confidence") == sorted(differs.values(
        "ground_truth.predicted_confidence"))
    (key, value), = fiftyone_review.shown_label_attributes(ds).items()
    assert key == f"shownLabelAttributes-{ds._doc.id}"
    assert json.loads(value)["ground_truth"][:4] == ["label", "predicted_label", "predicted_confidence", "mistakenness"]
    # a rerun without logits drops the stale rule view and the rule's labels
    run(EvaluateSplit(str(inputs["train"]), str(inputs["predictions"]), str(tmp_path / "r2"), "train", "/unused"),
        EvaluateConfig(dataset=ds.name))
    assert "eval_model_train-rule-differs" not in ds.list_saved_views()
    assert set(ds.match(F("split") == "train").values("ground_truth.detections.rule_label", unwind=True)) == {None}
