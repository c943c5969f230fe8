"""Report benchmark: scoring and report.html for 23,699 ROIs over 79 classes, part by part.

    python bench/report.py

Data: the real train split's ids and labels (shared/data/fathomnet2025/train_annotation_labels.csv)
with synthetic boxes, model-like logits (mostly right, confusions between taxonomic neighbours), 1%
of ROIs skipped, and a third of the images on disk (so 50 candidate crops are cut from real files).
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
DATA = ROOT / "fathompipe" / "data"  # the shipped reference data: test split, train labels


def make_inputs(work: Path):
    from PIL import Image

    from fathompipe.annotations import load_coco
    from support.synthetic import train_like_coco
    from fathompipe.evaluation.taxonomy import taxonomic_order

    ds = load_coco(train_like_coco(DATA / "train_annotation_labels.csv", DATA / "dataset_test.json",
                                   work / "train.json"))
    names, order = ds.class_names(), taxonomic_order()
    rng = np.random.default_rng(0)
    n = len(ds.annotations)
    truth_pos = np.array([order.index(ds.categories[a.category_id]) for a in ds.iter_annotations()])
    pos = np.clip(truth_pos + np.where(rng.random(n) < 0.85, 0, rng.choice([-2, -1, 1, 2], n)), 0, 78)
    logits = rng.normal(0, 1, (n, 79)).astype(np.float32)
    logits[np.arange(n), [names.index(order[p]) for p in pos]] += rng.uniform(1, 12, n).astype(np.float32)
    keep = rng.random(n) >= 0.01
    ids = np.array([a.id for a in ds.iter_annotations()])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pd.DataFrame({"annotation_id": ids[keep], "concept_name": np.array(names)[logits.argmax(1)][keep],
                  "confidence": p.max(1)[keep], "logits": list(logits[keep])}).to_parquet(work / "predictions.parquet")
    pd.DataFrame([(a.id, a.image_id, "image missing: bench") for a, k in zip(ds.iter_annotations(), keep) if not k],
                 columns=["annotation_id", "image_id", "reason"]).to_csv(work / "predictions.skipped.csv", index=False)
    images = work / "images"
    images.mkdir()
    Image.new("RGB", (1920, 1080), (40, 80, 120)).save(work / "one.png")
    for im in list(ds.images)[::3]:
        os.link(work / "one.png", images / im.file_name)
    return ds, images


def main() -> None:
    work = Path(tempfile.mkdtemp())
    ds, images = make_inputs(work)
    from fathompipe.evaluation import report, scoring
    rows = []
    t0 = time.perf_counter()
    preds = scoring.load_predictions(work / "predictions.parquet")
    rows.append(("load_predictions (parquet with logits, skipped.csv)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    ev = scoring.score(ds, preds)
    rows.append(("score: table, metrics, per rank, per class, mistakenness", time.perf_counter() - t0))
    t0 = time.perf_counter()
    report.write_report(ev, ds, work / "report", "bench", images, "file_name", {})
    rows.append(("write_report: CSVs, SVG matrix, 50 crops, report.html", time.perf_counter() - t0))
    size = (work / "report" / "report.html").stat().st_size
    print(f"\n## bench/report.py: {len(ds.annotations)} ROIs, {ev.metrics['n_predictions']} predicted, "
          f"{os.cpu_count()} cores; report.html {size / 1e6:.2f} MB\n")
    print("| step | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    print(f"| total | {sum(s for _, s in rows):.2f} |")


if __name__ == "__main__":
    main()
