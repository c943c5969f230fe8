"""Evaluate benchmark: importing 23,699 predictions into an 8,980-sample FiftyOne dataset.

    python bench/evaluate.py

fathompipe's import through both of its paths (the raw bulk write used on open-source FiftyOne with a
direct MongoDB connection, and the public-API path `values` + `set_values` used through FiftyOne
Enterprise's API), first import and in-place re-import, against FiftyOne's own bulk `set_values`
written by hand and the per-sample `sample.save()` loop users run today, on a private mongod; then
the whole evaluate stage (report and FiftyOne import and evaluation). Data: the real train split's ids and labels
(shared/data/fathomnet2025/train_annotation_labels.csv) with synthetic boxes and predictions.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("FATHOMPIPE_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data" / "fathomnet2025"


def main() -> None:
    from support.mongod import PrivateMongod
    mongod = PrivateMongod()
    os.environ["FIFTYONE_DATABASE_URI"] = mongod.uri
    os.environ["FIFTYONE_DATABASE_NAME"] = "fathompipe-bench"
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
    try:
        run(Path(tempfile.mkdtemp()))
    finally:
        mongod.stop()


def run(work: Path) -> None:
    import fiftyone as fo
    from fathompipe.evaluation import fiftyone_io
    from fathompipe.annotations import load_coco
    from fathompipe.evaluate import run as evaluate_stage
    from fathompipe.evaluation.evaluate_inputs import FiftyOneTarget
    from support.synthetic import train_like_coco

    ann = train_like_coco(DATA / "train_annotation_labels.csv", DATA / "dataset_test.json", work / "train.json")
    coco = load_coco(ann)
    rng = np.random.default_rng(0)
    names = coco.class_names()
    preds = pd.DataFrame({"annotation_id": [a.id for a in coco.annotations],
                          "concept_name": [coco.categories[a.category_id] if rng.random() < 0.7 else
                                           names[rng.integers(79)] for a in coco.annotations],
                          "confidence": rng.uniform(0.05, 1, len(coco.annotations))})
    preds.to_parquet(work / "predictions.parquet")
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
    evaluate_stage(ann, work / "predictions.parquet", work / "report", split="train",
                   fiftyone=FiftyOneTarget("bench-stage"))
    rows.append(("whole evaluate stage (report + ingest + import + evaluate_detections + saved view)",
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
