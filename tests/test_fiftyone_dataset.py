"""The evaluate stage on the researchers' own dataset schema (tests/researchers_dataset.py), on a private mongod:
both splits in one dataset with colliding ids, `unknown` test labels, cloud file paths, retagged `val`
samples, and review work (tags, attributes, an evaluation and a view of their own) that must survive."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict

import pytest

from conftest import DATA
from fathompipe.annotations import load_coco
from fathompipe.config import EvaluateConfig
from fathompipe.evaluate import run, run_job
from fathompipe.jobs import EvaluateJob, EvaluateSplit
from fathompipe.predictions import read_predictions
from researchers_dataset import ingest_like_researchers, model_like_predictions, retag_val, train_like_subset

TEST_JSON = DATA / "dataset_test.json"
WINNER = DATA / "winner_test_predictions.csv"
N_TRAIN_IMAGES = 300


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("researchers")
    train = train_like_subset(d, N_TRAIN_IMAGES)
    model_like_predictions(train, d / "train_a.parquet", seed=1)
    model_like_predictions(train, d / "train_b.parquet", seed=2)  # a second model run: other labels
    return {"train": train, "test": TEST_JSON, "train_a": d / "train_a.parquet", "train_b": d / "train_b.parquet"}


def raw_docs(ds, split: str) -> Dict[object, dict]:
    """Every stored document of a split, as MongoDB holds it (private API, read only: the strictest check)."""
    return {d["_id"]: d for d in ds._sample_collection.find({"split": split})}


def first_diff(a: object, b: object, path: str = "") -> str:
    """Where two stored documents first differ: a readable assertion message."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} {a!r:.200} != {type(b).__name__} {b!r:.200}"
    if isinstance(a, dict):
        for k in set(a) | set(b):
            if k not in a or k not in b:
                return f"{path}.{k}: missing on one side ({a.get(k)!r:.200} / {b.get(k)!r:.200})"
            d = first_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return ""
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: len {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return ""
    return "" if a == b else f"{path}: {a!r:.200} != {b!r:.200}"


def without_timestamps(docs: Dict[object, dict]) -> Dict[object, dict]:
    return {k: {f: v for f, v in d.items() if f != "last_modified_at"} for k, d in docs.items()}


def predicted_names(path: Path) -> Dict[int, str]:
    p = read_predictions(path)
    return dict(zip(p.annotation_id.tolist(), p.concept_name.tolist()))


def check_predictions_sit_on_their_annotations(ds, split: str, coco_json: Path, predictions: Path) -> int:
    coco = load_coco(coco_json)
    image_of = {a.id: a.image_id for a in coco.iter_annotations()}
    expected = predicted_names(predictions)
    n = 0
    for sample in ds.match_tags([split, "val"] if split == "train" else split).select_fields(
            ["split", "image_id", "ground_truth", "model_predictions"]):
        assert sample.split == split
        gt = {d.annotation_id: d for d in sample.ground_truth.detections}
        for pred in sample.model_predictions.detections:
            assert image_of[pred.annotation_id] == sample.image_id  # its own image
            assert pred.annotation_id in gt and pred.bounding_box == gt[pred.annotation_id].bounding_box
            assert pred.label == expected[pred.annotation_id]
            n += 1
    return n


def test_train_then_test_then_train_keeps_splits_apart_and_review_work(fiftyone_db, inputs, tmp_path):
    import fiftyone as fo
    from fiftyone import ViewField as F

    ds = ingest_like_researchers("fathomnet-2025-r1", {"train": inputs["train"], "test": inputs["test"]})
    val_ids = retag_val(ds)
    assert len(val_ids) == N_TRAIN_IMAGES // 5 and len(ds.match_tags("test")) == 325
    target = EvaluateConfig(dataset=ds.name)
    test_before = raw_docs(ds, "test")

    # 1. train: every prediction on its own image's annotation, the test split untouched
    first = run(EvaluateSplit(str(inputs["train"]), str(inputs["train_a"]), str(tmp_path / "r1"), "train", "/unused"),
                target)["fiftyone"]
    ds.reload()
    n_train = len(read_predictions(inputs["train_a"]))
    assert first["imported"] == n_train and first["unmatched"] == 0 and first["samples"] == N_TRAIN_IMAGES
    assert check_predictions_sit_on_their_annotations(ds, "train", inputs["train"], inputs["train_a"]) == n_train
    assert raw_docs(ds, "test") == test_before
    assert len(ds) == N_TRAIN_IMAGES + 325  # nothing re-ingested
    # the report and the App's evaluation cover the same annotations, retagged `val` samples included
    results = ds.load_evaluation_results("eval_model_train")
    assert len(results.ytrue) == n_train and ds.match_tags("val").count("model_predictions.detections") > 0

    # 2. review work, as the researchers do it: their own verification code, tags, an attribute, a view
    print(ds.count_values("model_predictions.detections.label"))
    theirs = ds.match_tags("train").evaluate_detections("model_predictions", gt_field="ground_truth",
                                                        eval_key="model_eval")
    theirs.print_report()
    theirs.plot_confusion_matrix()  # plotly's default backend: needs anywidget
    wrong = ds.filter_labels("model_predictions", F("label") != "Asteroidea").limit(4)
    wrong.tag_labels("label_error", label_fields="model_predictions")
    first_sample = ds.match(F("split") == "train").first()
    first_sample.model_predictions.detections[0]["reviewed_by"] = "murilo"
    first_sample.ground_truth.detections[0].tags.append("checked")
    first_sample.save()
    ds.save_view("their-view", ds.match_tags("val"))
    ids_before = {d.annotation_id: d.id for d in ds.match(F("split") == "train").values(
        "model_predictions.detections", unwind=True)}
    tagged_before = ds.count_label_tags("model_predictions")
    marks_before = {k: v for k, v in ds.count_values("model_predictions.detections.model_eval").items() if k}
    train_before = raw_docs(ds, "train")

    # 3. test: unlabelled, `unknown` labels; the train split (and its review work) is not touched
    second = run(EvaluateSplit(str(inputs["test"]), str(WINNER), str(tmp_path / "r2"), "test", "/unused"), target)
    info = second["fiftyone"]
    ds.reload()
    assert info["imported"] == 788 and info["samples"] == 325 and "saved_view" not in info
    assert raw_docs(ds, "train") == train_before
    assert check_predictions_sit_on_their_annotations(ds, "test", inputs["test"], WINNER) == 788
    assert set(ds.match(F("split") == "test").distinct("ground_truth.detections.label")) == {"unknown"}

    # 4. train again with another model run: updated in place, review work kept, own evaluation current
    test_after = raw_docs(ds, "test")
    run(EvaluateSplit(str(inputs["train"]), str(inputs["train_b"]), str(tmp_path / "r3"), "train", "/unused"), target)
    ds.reload()
    # FiftyOne's delete_evaluation (replacing the stage's previous evaluation) stamps `last_modified_at` on
    # every sample of the dataset; nothing else of the test split may differ
    assert without_timestamps(raw_docs(ds, "test")) == without_timestamps(test_after)
    assert check_predictions_sit_on_their_annotations(ds, "train", inputs["train"], inputs["train_b"]) == n_train
    ids_after = {d.annotation_id: d.id for d in ds.match(F("split") == "train").values(
        "model_predictions.detections", unwind=True)}
    assert ids_after == ids_before  # the same detection for the same annotation
    assert ds.count_label_tags("model_predictions") == tagged_before and tagged_before["label_error"] >= 4
    sample = ds[first_sample.id]
    assert sample.model_predictions.detections[0]["reviewed_by"] == "murilo"
    assert "checked" in sample.ground_truth.detections[0].tags
    assert {"model_eval", "eval_model_train"} <= set(ds.list_evaluations())
    assert {"their-view", "eval_model_train-disagreements"} <= set(ds.list_saved_views())
    marks = {k: v for k, v in ds.count_values("model_predictions.detections.model_eval").items() if k}
    assert marks == marks_before and marks["tp"] > 0  # their marks stay on the predictions
    # the stage's evaluation follows the new predictions, not the first ones
    b = predicted_names(inputs["train_b"])
    coco = load_coco(inputs["train"])
    truth = {a.id: coco.categories[a.category_id] for a in coco.iter_annotations()}
    wrong_b = sum(name != truth[aid] for aid, name in b.items())
    assert ds.count_values("model_predictions.detections.eval_model_train").get("fp", 0) == wrong_b
    assert len(ds.load_saved_view("eval_model_train-disagreements")) == wrong_b
    results = ds.load_evaluation_results("eval_model_train")
    assert sorted(results.ypred) == sorted(b.values())
    assert isinstance(fo.load_dataset(ds.name), fo.Dataset)


def test_both_splits_into_a_fresh_dataset_in_one_process(fiftyone_db, inputs, tmp_path):
    """What jobs/pace.yaml does: [train, test] into a dataset that does not exist yet."""
    import fiftyone as fo
    from fiftyone import ViewField as F

    job = EvaluateJob((EvaluateSplit(str(inputs["train"]), str(inputs["train_a"]), str(tmp_path / "train"), "train",
                                     "/d/tr"),
                       EvaluateSplit(str(inputs["test"]), str(WINNER), str(tmp_path / "test"), "test", "/d/te")),
                      EvaluateConfig(dataset="fresh-both"))
    done = run_job(job)
    assert set(done) == {"train", "test"}
    ds = fo.load_dataset("fresh-both")
    assert len(ds.match(F("split") == "train")) == N_TRAIN_IMAGES and len(ds.match(F("split") == "test")) == 325
    assert check_predictions_sit_on_their_annotations(ds, "test", inputs["test"], WINNER) == 788
    assert check_predictions_sit_on_their_annotations(ds, "train", inputs["train"], inputs["train_a"]) > 0
    assert ds.match(F("split") == "test").first().filepath.startswith("/d/te/")
    assert run_job(job) == {}  # both done: nothing redone


def test_label_outside_the_79_on_the_evaluated_split_is_one_clear_error(fiftyone_db, inputs, tmp_path):
    from fiftyone import ViewField as F

    from fathompipe.evaluate import main

    ds = ingest_like_researchers("fathomnet-2025-r3", {"train": inputs["train"], "test": inputs["test"]})
    sample = ds.match(F("split") == "train").first()
    bad = sample.ground_truth.detections[0]
    bad.label = "Sea monster"
    sample.save()
    args = ["--annotations", str(inputs["train"]), "--predictions", str(inputs["train_a"]), "--split", "train",
            "--dataset", ds.name]
    assert main([*args, "--report-dir", str(tmp_path / "r")]) == 1
    assert not ds.has_sample_field("model_predictions")  # nothing written
    # the same labels on the other split would not matter: the test split's `unknown` never did
    assert main(["--annotations", str(inputs["test"]), "--predictions", str(WINNER), "--split", "test",
                 "--dataset", ds.name, "--report-dir", str(tmp_path / "t")]) == 0


def test_label_error_message(fiftyone_db, inputs, tmp_path, capsys):
    from fiftyone import ViewField as F

    ds = ingest_like_researchers("fathomnet-2025-r4", {"train": inputs["train"]})
    sample = ds.match(F("split") == "train").first()
    sample.ground_truth.detections[0].label = "unknown"
    sample.save()
    aid = sample.ground_truth.detections[0].annotation_id
    from fathompipe.evaluation.fiftyone_io import FiftyOneDataError
    with pytest.raises(FiftyOneDataError) as err:
        run(EvaluateSplit(str(inputs["train"]), str(inputs["train_a"]), str(tmp_path / "r"), "train"),
            EvaluateConfig(dataset=ds.name))
    assert str(err.value).startswith(f"dataset 'fathomnet-2025-r4', split train: annotation {aid} "
                                     f"(image {sample.image_id}) has the ground-truth label 'unknown'")


def test_raw_and_public_writes_give_identical_datasets(fiftyone_db, inputs, monkeypatch):
    """The raw bulk write is allowed only because this holds on the installed open-source FiftyOne."""
    from fiftyone import ViewField as F

    from fathompipe.evaluation import fiftyone_io

    monkeypatch.setattr(fiftyone_io, "BATCH", 7)  # many batches: the batch edges must not show
    coco = load_coco(inputs["train"])
    a_preds = fiftyone_io.RoiValues.of(coco, read_predictions(inputs["train_a"]))
    b_preds = fiftyone_io.RoiValues.of(coco, read_predictions(inputs["train_b"]))
    raw = ingest_like_researchers("paths-raw", {"train": inputs["train"], "test": inputs["test"]})
    public = raw.clone("paths-public")

    def strip(docs, drop_ids: bool) -> Dict[object, dict]:
        out = {}
        for k, d in docs.items():
            d = copy.deepcopy(d)
            for stamp in ("last_modified_at", "created_at", "_dataset_id"):  # differ between two datasets
                d.pop(stamp)
            for det in (d.get("model_predictions") or {}).get("detections", []):
                if drop_ids:
                    det.pop("_id")
            out[k] = d
        return out

    assert fiftyone_io.import_predictions(raw, "train", a_preds, "model_predictions", True, raw=True).raw
    assert not fiftyone_io.import_predictions(public, "train", a_preds, "model_predictions", True,
                                              raw=False).raw
    a, b = strip(raw_docs(raw, "train"), True), strip(raw_docs(public, "train"), True)
    assert a == b, first_diff(a, b)
    assert raw.get_field_schema(flat=True).keys() == public.get_field_schema(flat=True).keys()

    # review work on identical copies, then a re-import through each path
    public.delete()
    public = raw.clone("paths-public")
    for ds in (raw, public):
        ds.filter_labels("model_predictions", F("confidence") > 0.5).limit(3).tag_labels(
            "label_error", label_fields="model_predictions")
        s = ds.match(F("split") == "train").first()
        s.model_predictions.detections[0]["note"] = "looks like a crab"
        s.save()
    before = raw_docs(raw, "train")
    fiftyone_io.import_predictions(raw, "train", b_preds, "model_predictions", True, raw=True)
    fiftyone_io.import_predictions(public, "train", b_preds, "model_predictions", True, raw=False)
    after_raw, after_public = raw_docs(raw, "train"), raw_docs(public, "train")
    a, b = strip(after_raw, False), strip(after_public, False)
    assert a == b, first_diff(a, b)
    assert all(after_raw[k]["last_modified_at"] > before[k]["last_modified_at"] for k in before)
    assert raw.get_field_schema(flat=True).keys() == public.get_field_schema(flat=True).keys()
    a, b = strip(raw_docs(raw, "test"), False), strip(raw_docs(public, "test"), False)
    assert a == b, first_diff(a, b)


def test_raw_and_public_ingest_store_the_same_samples(fiftyone_db, inputs, monkeypatch):
    """The raw ingest is allowed only because it stores what `add_samples` stores: the same documents (ids,
    `_rand` and timestamps aside), the same schema, and a dataset FiftyOne reads back as samples; in batches."""
    from fathompipe.evaluation import fiftyone_io

    monkeypatch.setattr(fiftyone_io, "BATCH", 13)

    for split in ("train", "test"):
        coco = load_coco(inputs[split])
        raw = fiftyone_io.ingest(f"ingest-raw-{split}", coco, "/d", split, "file_name", raw=True)
        public = fiftyone_io.ingest(f"ingest-public-{split}", coco, "/d", split, "file_name", raw=False)

        def by_image(ds) -> Dict[object, dict]:
            out = {}
            for d in raw_docs(ds, split).values():
                d = {k: v for k, v in d.items() if k not in ("_id", "_rand", "_dataset_id", "created_at",
                                                             "last_modified_at")}
                for det in d["ground_truth"]["detections"]:
                    det.pop("_id")
                out[d["image_id"]] = d
            return out

        a, b = by_image(raw), by_image(public)
        assert len(a) == len(coco.images) and a == b, first_diff(a, b)
        assert all(0.999 <= d["_rand"] < 1 and d["_media_type"] == "image" for d in raw_docs(raw, split).values())
        assert raw.get_field_schema(flat=True).keys() == public.get_field_schema(flat=True).keys()
        sample = raw.match_tags(split).last()  # a raw-written sample, read through FiftyOne's own classes
        assert sample.ground_truth.detections[0].annotation_id in {a.id for a in coco.iter_annotations()}
        assert fiftyone_io.ingest(raw.name, coco, "/d", split, "file_name", raw=True) and len(raw) == len(a)
