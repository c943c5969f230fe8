"""Evaluate benchmark: the whole evaluate stage on a train-sized split (8,980 samples, 23,699 ROIs), the original
stage beside today's, part by part, in one run on one private mongod; then (`--imports`) the prediction import paths.

    python bench/evaluate.py              # the stage, original vs new
    python bench/evaluate.py --imports    # also: import paths against FiftyOne's bulk API and the per-sample loop

The original is the stage as issue 13 found it (commit ORIGINAL, unpacked with `git archive` and imported as the
package `fathompipe_main`), run through the same steps as its `evaluate.run`: scoring and report, ingest, import,
`evaluate_detections`, the saved view. The new stage adds mistakenness, review views and the embeddings
visualization (1,024-d embeddings beside the predictions, as the infer stage writes them, mapped to 2-D with an
empty numba cache, as in a node's first evaluate job) and stores the evaluation from the known ROI pairs
(fathompipe/evaluation/fiftyone_eval.py). Data: the real train split's ids and labels
(fathompipe/data/train_annotation_labels.csv) with synthetic boxes, predictions and embeddings.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORIGINAL = "0a3c781"  # main before issue 13: the evaluate stage whose time the issue measured
DATA = ROOT / "fathompipe" / "data"  # the shipped reference data: test split, train labels


def main() -> None:
    if sys.argv[1:2] == ["--new-stage"]:  # one evaluate job of the new stage, in its own process (compare_stages)
        work, ann, name = sys.argv[2:5]
        print(json.dumps(new_stage(Path(work), Path(ann), name)))
        return
    # an empty numba cache: the new stage's first job compiles the 2-D map's functions, a later job reads them
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fathompipe-bench-numba-")
    from support.mongod import PrivateMongod
    mongod = PrivateMongod()
    os.environ["FIFTYONE_DATABASE_URI"] = mongod.uri
    os.environ["FIFTYONE_DATABASE_NAME"] = "fathompipe-bench"
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
    try:
        work = Path(tempfile.mkdtemp())
        ann, coco, preds = inputs(work)
        compare_stages(work, ann, coco)
        if "--imports" in sys.argv:
            run(work, ann, coco, preds)
    finally:
        mongod.stop()


def inputs(work: Path):
    """The train-like annotations, predictions.parquet and predictions.embeddings.npz beside it."""
    from fathompipe.annotations import load_coco
    from fathompipe.layout import OutputFiles
    from support.synthetic import train_like_coco

    ann = train_like_coco(DATA / "train_annotation_labels.csv", DATA / "dataset_test.json", work / "train.json")
    coco = load_coco(ann)
    rng = np.random.default_rng(0)
    names = coco.class_names()
    preds = pd.DataFrame({"annotation_id": [a.id for a in coco.iter_annotations()],
                          "concept_name": [coco.categories[a.category_id] if rng.random() < 0.7 else
                                           names[rng.integers(79)] for a in coco.iter_annotations()],
                          "confidence": rng.uniform(0.05, 1, len(coco.annotations))})
    preds.to_parquet(work / "predictions.parquet")
    centres = rng.normal(0, 1, (79, 1024)).astype(np.float32)
    index = {n: i for i, n in enumerate(names)}
    embeddings = centres[[index[n] for n in preds["concept_name"]]] + rng.normal(0, 0.5, (len(preds), 1024))
    np.savez(OutputFiles(work / "predictions.csv").embeddings, annotation_id=preds["annotation_id"].to_numpy(),
             embeddings=embeddings.astype(np.float32))
    return ann, coco, preds


def main_package(work: Path) -> str:
    """The ORIGINAL commit's fathompipe as the package `fathompipe_main` (its relative imports stay inside it)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ORIGINAL, "fathompipe"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(work / "main_src", filter="data")
    (work / "main_src" / "fathompipe").rename(work / "main_src" / "fathompipe_main")
    sys.path.insert(0, str(work / "main_src"))
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ORIGINAL], check=True,
                          capture_output=True, text=True).stdout.strip()


@contextmanager
def part(times: Dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def original_stage(work: Path, ann: Path) -> Dict[str, float]:
    """The original evaluate.run and fiftyone_io.evaluate_in_app, step by step (the same calls, timed)."""
    from fiftyone import ViewField as F
    from fathompipe_main import fiftyone_io as old_io
    from fathompipe_main.annotations import load_coco
    from fathompipe_main.report import evaluate as score
    from fathompipe_main.report import load_predictions, write_report

    t: Dict[str, float] = {}
    with part(t, "scoring (report tables; new: + mistakenness)"):
        dataset, preds = load_coco(ann), load_predictions(work / "predictions.parquet")
        ev = score(dataset, preds)
    with part(t, "report files (report.html, plots, CSVs)"):
        write_report(ev, dataset, work / "report-original", "train", None, "file_name", {})
    with part(t, "FiftyOne ingest (original: add_samples; new: one add_samples + raw insert_many)"):
        ds = old_io.ingest("bench-original", dataset, "/data/train", "train", "file_name")
    with part(t, "FiftyOne import of the predictions"):
        old_io.import_predictions(ds, preds, "model_predictions", bool(ev.metrics["labelled"]))
    view = ds.match_tags("train")  # main's evaluate_in_app, its statements timed one by one
    with part(t, "App evaluation (per-label fields, stored results)"):
        view.evaluate_detections("model_predictions", gt_field="ground_truth", eval_key="eval_model_train",
                                 classwise=False, iou=0.5, progress=False)
    with part(t, "saved views"):
        disagreements = (view.filter_labels("model_predictions", F("eval_model_train") == "fp")
                         .to_patches("model_predictions").sort_by("model_predictions.confidence", reverse=True))
        ds.save_view("eval_model_train-disagreements", disagreements, overwrite=True)
    return t


def new_stage(work: Path, ann: Path, name: str) -> Dict[str, float]:
    """Today's evaluate.run and load_fiftyone, step by step (the same calls, timed), into dataset `name`."""
    from fathompipe.evaluation import fiftyone_eval, fiftyone_io, fiftyone_review
    from fathompipe.annotations import load_coco
    from fathompipe.evaluate import mistakenness_by_roi
    from fathompipe.evaluation.report import write_report
    from fathompipe.evaluation.scoring import load_predictions, score

    t: Dict[str, float] = {}
    with part(t, "scoring (report tables; new: + mistakenness)"):
        dataset, preds = load_coco(ann), load_predictions(work / "predictions.parquet")
        ev = score(dataset, preds)
    with part(t, "report files (report.html, plots, CSVs)"):
        write_report(ev, dataset, work / "report-new", "train", None, "file_name", {})
    with part(t, "FiftyOne ingest (original: add_samples; new: one add_samples + raw insert_many)"):
        ds = fiftyone_io.ingest(name, dataset, "/data/train", "train", "file_name")
    with part(t, "FiftyOne import of the predictions"):
        fiftyone_io.import_predictions(ds, "train", dataset, preds, "model_predictions", True)
    view = fiftyone_io.split_view(ds, "train")
    with part(t, "App evaluation (per-label fields, stored results)"):
        fiftyone_eval.evaluate(ds, view, "model_predictions", "eval_model_train", mistakenness_by_roi(ev.table),
                               fiftyone_io.raw_writes_allowed())
    with part(t, "saved views"):
        fiftyone_review.save_views(ds, view, "model_predictions", "eval_model_train")
    with part(t, "embeddings visualization (Brain run)"):
        info = fiftyone_review.visualize(ds, view, fiftyone_review.embeddings_beside(work / "predictions.parquet"),
                                         "eval_model_train_embeddings")
    assert info["embedded_rois"] == ds.count("ground_truth.detections"), info
    check_stored_evaluation(ds, "eval_model_train")
    return t


def check_stored_evaluation(ds, eval_key: str) -> None:
    """The App's stored evaluation: a report and a true confusion matrix equal to sklearn's on the pairs."""
    from sklearn.metrics import confusion_matrix
    results = ds.load_evaluation_results(eval_key)
    labels = sorted(set(results.ytrue) | set(results.ypred))
    assert np.array_equal(results.confusion_matrix(classes=labels),
                          confusion_matrix(list(results.ytrue), list(results.ypred), labels=labels))
    assert len(results.report()) > 79


def compare_stages(work: Path, ann: Path, coco) -> None:
    """The original in this process; the new stage as two evaluate jobs, each a fresh process into its own dataset:
    the first with the empty numba cache, the second after it (what every later job on that kind of node sees)."""
    commit = main_package(work)
    original = original_stage(work, ann)
    first, later = (json.loads(subprocess.run([sys.executable, __file__, "--new-stage", str(work), str(ann),
                                               f"bench-new-{job}"], check=True, capture_output=True,
                                              text=True).stdout.splitlines()[-1]) for job in (1, 2))
    n = len(coco.annotations)
    print(f"\n## bench/evaluate.py: the evaluate stage, original ({commit}) vs this tree: {len(coco.images)} samples, "
          f"{n} ROIs, {os.cpu_count()} cores\n")
    print("| part | original (s) | new, first job (s) | new, later jobs (s) |\n|---|---|---|---|")
    for name in dict.fromkeys([*original, *first]):
        a = f"{original[name]:.1f}" if name in original else "(none)"
        print(f"| {name} | {a} | {first[name]:.1f} | {later[name]:.1f} |")
    total, total_first, total_later = sum(original.values()), sum(first.values()), sum(later.values())
    print(f"| **whole stage** | **{total:.1f}** | **{total_first:.1f}** | **{total_later:.1f}** |")
    print(f"\nnew stage {total / total_later:.1f}x faster than the original in a later job, {total / total_first:.1f}x "
          f"in the first (numba compiling the 2-D map), with mistakenness, two review views and the embeddings "
          f"visualization added; stored evaluation checked against sklearn")


def run(work: Path, ann: Path, coco, preds: pd.DataFrame) -> None:
    import fiftyone as fo
    from fathompipe.evaluate import run as evaluate_stage
    from fathompipe.evaluation import fiftyone_io
    from fathompipe.config import EvaluateConfig
    from fathompipe.jobs import EvaluateSplit

    indexed = preds.set_index("annotation_id")
    rows = []

    t0 = time.perf_counter()
    ds = fiftyone_io.ingest("bench-raw", coco, "/data/train", "train", "file_name")
    rows.append(("ingest 8,980 images / 23,699 boxes (add_samples)", time.perf_counter() - t0))
    public = ds.clone("bench-public")
    timed = {}
    for name, target, raw in (("raw", ds, True), ("public", public, False)):
        t0 = time.perf_counter()
        result = fiftyone_io.import_predictions(target, "train", coco, indexed, "model_predictions", True, raw=raw)
        timed[name] = time.perf_counter() - t0
        what = "raw bulk write (open-source, direct MongoDB)" if raw else \
            "public API: values + set_values (any connection)"
        rows.append((f"fathompipe import of {result.written} predictions, {what}", timed[name]))
    n = result.written
    for name, target, raw in (("raw", ds, True), ("public", public, False)):
        t0 = time.perf_counter()
        fiftyone_io.import_predictions(target, "train", coco, indexed, "model_predictions", True, raw=raw)
        rows.append((f"fathompipe re-import in place ({name}: ids, tags, attributes kept)", time.perf_counter() - t0))
    assert ds.count("model_predictions.detections") == public.count("model_predictions.detections") == n

    t0 = time.perf_counter()  # FiftyOne's own bulk API as a user would write it: replaces the field, keeps nothing
    label_of, confidence_of = indexed["concept_name"].to_dict(), indexed["confidence"].to_dict()
    gt = ds.values("ground_truth.detections")
    values = [fo.Detections(detections=[fo.Detection(label=label_of[d.annotation_id], bounding_box=d.bounding_box,
                                                     annotation_id=d.annotation_id,
                                                     confidence=float(confidence_of[d.annotation_id]))
                                        for d in dets]) for dets in gt]
    ds.set_values("bulk_predictions", values)
    bulk = time.perf_counter() - t0
    rows.append(("FiftyOne's bulk API by hand: values + Detection objects + one set_values", bulk))

    clone = ds.clone("bench-loop")
    t0 = time.perf_counter()
    for sample in clone.iter_samples(progress=False):  # what users run today
        dets = []
        for gt in sample.ground_truth.detections:
            row = indexed.loc[gt.annotation_id]
            dets.append(fo.Detection(label=row.concept_name, bounding_box=gt.bounding_box,
                                     confidence=float(row.confidence), annotation_id=gt.annotation_id))
        sample["loop_predictions"] = fo.Detections(detections=dets)
        sample.save()
    loop = time.perf_counter() - t0
    rows.append(("per-sample sample.save() loop", loop))

    t0 = time.perf_counter()
    evaluate_stage(EvaluateSplit(str(ann), str(work / "predictions.parquet"), str(work / "report"), "train"),
                   EvaluateConfig(dataset="bench-stage"))
    rows.append(("whole evaluate stage (report, ingest, import, evaluation, views, embeddings visualization)",
                 time.perf_counter() - t0))

    print(f"\n## bench/evaluate.py: {len(coco.images)} samples, {n} predictions, {os.cpu_count()} cores\n")
    print("| step | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"\nagainst the per-sample loop: raw path {loop / timed['raw']:.1f}x, public-API path "
          f"{loop / timed['public']:.1f}x, FiftyOne's bulk API by hand {loop / bulk:.1f}x faster; "
          f"raw path {timed['public'] / timed['raw']:.1f}x faster than the public-API path")


if __name__ == "__main__":
    main()
