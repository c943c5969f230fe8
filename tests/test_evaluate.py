"""The evaluate stage: the metric end to end, the report, and real FiftyOne on a private mongod."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import DATA, ROOT
from fathompipe.annotations import load_coco
from fathompipe.evaluate import run
from fathompipe.config import EvaluateConfig
from fathompipe.jobs import EvaluateSplit
from support.synthetic import train_like_coco

TEST_JSON = DATA / "dataset_test.json"
WINNER = DATA / "winner_test_predictions.csv"


def official_matrix() -> dict:
    with open(DATA / "distance_matrix_official.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    return {(r[0], p): int(float(v)) for r in rows[1:] for p, v in zip(rows[0][1:], r[1:])}


@pytest.fixture(scope="module")
def train_like(tmp_path_factory):
    """23,699 labelled annotations (real ids and labels, synthetic boxes) and model-like predictions:
    70% right, the rest a relative or anything; some missing, some unknown names."""
    d = tmp_path_factory.mktemp("train")
    ann = train_like_coco(DATA / "train_annotation_labels.csv", TEST_JSON, d / "train.json")
    ds = load_coco(ann)
    names = ds.class_names()
    rng = np.random.default_rng(0)
    rows = []
    for a in ds.iter_annotations():
        truth = ds.categories[a.category_id]
        r = rng.random()
        if r < 0.002:
            continue  # missing prediction
        pred = truth if r < 0.7 else ("Not A Taxon" if r < 0.703 else names[rng.integers(len(names))])
        rows.append((a.id, pred, float(rng.uniform(0.05, 1.0))))
    preds = pd.DataFrame(rows, columns=["annotation_id", "concept_name", "confidence"])
    preds.to_parquet(d / "predictions.parquet")
    return ds, ann, d / "predictions.parquet", preds


def test_labelled_metrics_follow_the_official_rule(train_like, tmp_path):
    ds, ann, pred_path, preds = train_like
    run(EvaluateSplit(str(ann), str(pred_path), str(tmp_path / "report"), "train"), EvaluateConfig(fiftyone=False))
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    matrix = official_matrix()
    by_id = dict(zip(preds.annotation_id, preds.concept_name))
    expected = [matrix.get((ds.categories[a.category_id], by_id.get(a.id)), 12) for a in ds.iter_annotations()]
    assert m["mean_hierarchical_distance"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert m["n_annotations"] == 23699 and m["n_missing_predictions"] == 23699 - len(preds)
    assert m["n_unknown_names"] == int((preds.concept_name == "Not A Taxon").sum()) > 0
    correct = sum(by_id.get(a.id) == ds.categories[a.category_id] for a in ds.iter_annotations())
    assert m["accuracy"] == pytest.approx(correct / 23699)
    assert set(m["accuracy_per_rank"]) == {"phylum", "class", "order", "family", "genus", "species"}
    assert m["accuracy_per_rank"]["phylum"]["accuracy"] >= m["accuracy_per_rank"]["species"]["accuracy"]
    assert sum(m["distance_histogram"].values()) == 23699
    per_class = pd.read_csv(tmp_path / "report" / "per_class.csv")
    assert len(per_class) == 79 and per_class.support.sum() == 23699
    conf = pd.read_csv(tmp_path / "report" / "confusions.csv")
    assert conf["count"].is_monotonic_decreasing and (conf.truth != conf.prediction).all()


def test_unlabelled_split_says_no_score(tmp_path):
    run(EvaluateSplit(str(TEST_JSON), str(WINNER), str(tmp_path / "r")), EvaluateConfig(fiftyone=False))
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert not m["labelled"] and "mean_hierarchical_distance" not in m
    assert "no score can be computed" in m["note"] and sum(m["prediction_counts"].values()) == 788
    assert "no score can be computed" in (tmp_path / "r" / "report.html").read_text()


def test_fiftyone_test_split_import_is_idempotent(fiftyone_db, tmp_path):
    target = EvaluateConfig(dataset="fn-test-split")
    split = EvaluateSplit(str(TEST_JSON), str(WINNER), str(tmp_path / "r"), images_dir="/data/test_images")
    result = run(split, target)
    assert result["fiftyone"]["samples"] == 325 and result["fiftyone"]["predictions"] == 788
    again = run(split, target)
    assert again["fiftyone"]["predictions"] == 788 and again["fiftyone"]["samples"] == 325
    import fiftyone as fo
    ds = fo.load_dataset("fn-test-split")
    sample = ds.match(fo.ViewField("image_id") == 1).first()
    assert sample.filepath == "/data/test_images/000b8e39-7240-49fd-9f50-713edcb28544.png"
    assert sample.split == "test" and "test" in sample.tags
    assert (sample.metadata.width, sample.metadata.height) == (1920, 1080)
    gt = sample.ground_truth.detections[0]
    pred = sample.model_predictions.detections[0]
    assert gt.annotation_id == pred.annotation_id == 1 and pred.label == "Scotoplanes globosa"
    assert pred.bounding_box == pytest.approx([1001 / 1920, 424 / 1080, 68 / 1920, 44 / 1080])
    schema = ds.get_field_schema(flat=True)
    assert "ground_truth.detections.annotation_id" in schema and "model_predictions.detections.annotation_id" in schema


def test_existing_dataset_is_matched_not_reingested(fiftyone_db, tmp_path):
    import fiftyone as fo
    run(EvaluateSplit(str(TEST_JSON), str(WINNER), str(tmp_path / "a"), images_dir="/mnt/their/test_images"),
        EvaluateConfig(dataset="fn-existing", field="first"))
    ds = fo.load_dataset("fn-existing")
    ids = set(ds.values("id"))
    run(EvaluateSplit(str(TEST_JSON), str(WINNER), str(tmp_path / "b"), images_dir="/elsewhere"),
        EvaluateConfig(dataset="fn-existing", field="second"))
    ds.reload()
    assert set(ds.values("id")) == ids and ds.first().filepath.startswith("/mnt/their/test_images/")
    assert ds.count("second.detections") == 788


def test_train_sized_dataset_with_evaluation_and_saved_view(fiftyone_db, train_like, tmp_path):
    ds_coco, ann, pred_path, preds = train_like
    result = run(EvaluateSplit(str(ann), str(pred_path), str(tmp_path / "r"), "train", "/data/train"),
                 EvaluateConfig(dataset="fn-train", eval_key="eval_winner"))
    info = result["fiftyone"]
    assert info["samples"] == 8980 and info["predictions"] == len(preds)
    import fiftyone as fo
    from fiftyone import ViewField as F
    ds = fo.load_dataset("fn-train")
    assert "eval_winner_train" in ds.list_evaluations()
    results = ds.load_evaluation_results("eval_winner_train")
    wrong = int((preds.concept_name != preds.annotation_id.map(
        {a.id: ds_coco.categories[a.category_id] for a in ds_coco.iter_annotations()})).sum())
    view = ds.load_saved_view("eval_winner_train-disagreements")
    assert len(view) == wrong  # every disagreement, as a ground-truth patch carrying its prediction
    conf = view.values("ground_truth.predicted_confidence")
    assert None not in conf and conf == sorted(conf, reverse=True)  # each with its confidence, most confident first
    labels = [n for n in results.classes if n in ds_coco.class_names()]
    assert len(labels) >= 70  # a real 79-way confusion matrix, not a diagonal
    dist = ds.values("model_predictions.detections.hierarchical_distance", unwind=True)
    assert len(dist) == len(preds) and max(dist) <= 12 and min(dist) == 0
    assert ds.count(F("model_predictions.detections").length() > 0) > 0


def test_enterprise_variables_with_open_source_fiftyone_fail_clearly(tmp_path):
    env = {**os.environ, "FIFTYONE_API_URI": "https://fiftyone.example.edu", "FIFTYONE_API_KEY": "sekret-key-123"}
    proc = subprocess.run([sys.executable, "-m", "fathompipe.evaluate", "--annotations", str(TEST_JSON),
                           "--predictions", str(WINNER), "--report-dir", str(tmp_path / "r")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "open-source" in proc.stderr and "Enterprise SDK" in proc.stderr and "Traceback" not in proc.stderr
    assert "sekret-key-123" not in proc.stderr + proc.stdout
    assert (tmp_path / "r" / "report.html").exists()  # the report does not depend on FiftyOne
