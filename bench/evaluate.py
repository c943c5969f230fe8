"""Evaluate benchmark: the whole evaluate stage on a train-sized split (8,980 samples, 23,699 ROIs), the original
stage beside today's, part by part, in one run on one private mongod; with --imports, also the prediction import
paths against FiftyOne's own bulk API and the per-sample loop.

The original is the stage as issue 13 found it (commit ORIGINAL, unpacked with `git archive` and imported as the
package `fathompipe_main`), run through the same steps as its `evaluate.run`: scoring and report, ingest, import,
`evaluate_detections`, the saved view. Today's stage runs as `python -m fathompipe.evaluate`, twice, each a
fresh process into a fresh dataset, and its parts are read from the stage's own record (evaluate.done): the first
job with an empty numba cache (a node's first evaluate job compiles the 2-D map), the second after it (every
later job). It adds mistakenness, the expected-distance rule, three review views and the embeddings map, and
stores the evaluation from the known ROI pairs. Data: the real train split's ids and labels
(fathompipe/data/train_annotation_labels.csv) with synthetic boxes, and the infer stage's outputs merged from
model-like part files (support/synthetic.py's logits; 1,024-float embeddings near the predicted class).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ORIGINAL = "0a3c781"  # main before issue 13: the evaluate stage whose time the issue measured
DATA = ROOT / "fathompipe" / "data"  # the shipped reference data: test split, train labels
# today's parts, grouped as the original's steps (the original had no map: "(none)")
ROWS: List[Tuple[str, Tuple[str, ...], Tuple[str, ...]]] = [
    ("load and score (report tables; new: + mistakenness, the rule)", ("scoring",), ("load", "score")),
    ("report files (report.html, CSVs)", ("report",), ("report",)),
    ("FiftyOne ingest", ("ingest",), ("fiftyone ingest",)),
    ("FiftyOne import of the predictions", ("import",), ("fiftyone import",)),
    ("stored evaluation and saved views (new: + indexes, three views)", ("evaluation", "views"),
     ("fiftyone evaluation and views",)),
    ("embeddings map (Brain run)", (), ("embeddings map",)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--imports", action="store_true", help="also time the prediction import paths")
    args = parser.parse_args()
    from support.mongod import PrivateMongod
    mongod = PrivateMongod()
    os.environ.update(FIFTYONE_DATABASE_URI=mongod.uri, FIFTYONE_DATABASE_NAME="fathompipe-bench",
                      FIFTYONE_DATABASE_VALIDATION="false")
    try:
        work = Path(tempfile.mkdtemp())
        ann, parquet = inputs(work)
        compare_stages(work, ann, parquet, mongod.uri)
        if args.imports:
            imports(ann, parquet)
    finally:
        mongod.stop()


def inputs(work: Path) -> Tuple[Path, Path]:
    """The train-like annotations and the infer stage's outputs for them (predictions.parquet with logits and
    top-5, predictions.embeddings.npy), merged by fathompipe/predictions.py from model-like part files."""
    from fathompipe import atomic
    from fathompipe.annotations import load_coco
    from fathompipe.evaluation.taxonomy import load_taxonomy
    from fathompipe.layout import OutputFiles
    from fathompipe.predictions import merge
    from support.synthetic import model_like_logits, train_like_coco

    ann = train_like_coco(DATA / "train_annotation_labels.csv", DATA / "dataset_test.json", work / "train.json")
    coco = load_coco(ann)
    ids, logits = model_like_logits(ann, seed=0)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (logits.shape[1], 1024)).astype(np.float32)
    image_of = dict(zip(coco.annotations.id.tolist(), coco.annotations.image_id.tolist()))
    out = OutputFiles(work / "predictions.csv")
    out.parts.mkdir(parents=True)
    for index, start in enumerate(range(0, len(ids), 64)):
        rows = slice(start, start + 64)
        part_logits = logits[rows]
        embeddings = centres[part_logits.argmax(1)] + rng.normal(0, 0.5, (len(part_logits), 1024)).astype(np.float32)
        np.savez(out.part(0, index), annotation_id=ids[rows], image_id=np.asarray([image_of[a] for a in ids[rows]]),
                 logits=part_logits, note=np.asarray([""] * len(part_logits)), skipped=np.asarray([], dtype=str),
                 embeddings=embeddings)
    atomic.write_json(out.shard_marker(0, 1), {"rois": len(ids), "skipped": 0})
    merge(coco, out, list(load_taxonomy()), 1, "train")
    return ann, out.parquet


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


def original_stage(work: Path, ann: Path, parquet: Path) -> Dict[str, float]:
    """The original evaluate.run and fiftyone_io.evaluate_in_app, step by step (the same calls, timed)."""
    from fiftyone import ViewField as F
    from fathompipe_main import fiftyone_io as old_io
    from fathompipe_main.annotations import load_coco
    from fathompipe_main.report import evaluate as score
    from fathompipe_main.report import load_predictions, write_report

    t: Dict[str, float] = {}
    with part(t, "scoring"):
        dataset, preds = load_coco(ann), load_predictions(parquet)
        ev = score(dataset, preds)
    with part(t, "report"):
        write_report(ev, dataset, work / "report-original", "train", None, "file_name", {})
    with part(t, "ingest"):
        ds = old_io.ingest("bench-original", dataset, "/data/train", "train", "file_name")
    with part(t, "import"):
        old_io.import_predictions(ds, preds, "model_predictions", bool(ev.metrics["labelled"]))
    view = ds.match_tags("train")  # main's evaluate_in_app, its statements timed one by one
    with part(t, "evaluation"):
        view.evaluate_detections("model_predictions", gt_field="ground_truth", eval_key="eval_model_train",
                                 classwise=False, iou=0.5, progress=False)
    with part(t, "views"):
        disagreements = (view.filter_labels("model_predictions", F("eval_model_train") == "fp")
                         .to_patches("model_predictions").sort_by("model_predictions.confidence", reverse=True))
        ds.save_view("eval_model_train-disagreements", disagreements, overwrite=True)
    return t


def new_stage(ann: Path, parquet: Path, uri: str, name: str, numba_cache: str) -> Dict[str, float]:
    """One evaluate job of today's stage, `python -m fathompipe.evaluate` in a fresh process: its parts' seconds."""
    report_dir = Path(tempfile.mkdtemp())
    proc = subprocess.run([sys.executable, "-m", "fathompipe.evaluate", "--annotations", str(ann), "--predictions",
                           str(parquet), "--report-dir", str(report_dir), "--split", "train", "--images-dir",
                           "/data/train", "--dataset", name, "--database-uri", uri], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "NUMBA_CACHE_DIR": numba_cache})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    done = json.loads((report_dir / "evaluate.done").read_text())
    assert done["fiftyone"]["embedded_rois"] == done["fiftyone"]["ground_truth"], done["fiftyone"]
    return {k: v["seconds"] for k, v in done["parts"].items()}


def check_stored_evaluation(name: str, eval_key: str) -> None:
    """The App's stored evaluation: a report and a true confusion matrix equal to sklearn's on the pairs."""
    import fiftyone as fo
    from sklearn.metrics import confusion_matrix
    results = fo.load_dataset(name).load_evaluation_results(eval_key)
    labels = sorted(set(results.ytrue) | set(results.ypred))
    assert np.array_equal(results.confusion_matrix(classes=labels),
                          confusion_matrix(list(results.ytrue), list(results.ypred), labels=labels))
    assert len(results.report()) > 79


def compare_stages(work: Path, ann: Path, parquet: Path, uri: str) -> None:
    """The original in this process; today's stage as two evaluate jobs (empty numba cache, then warm)."""
    commit = main_package(work)
    original = original_stage(work, ann, parquet)
    numba_cache = tempfile.mkdtemp(prefix="fathompipe-bench-numba-")
    first, later = (new_stage(ann, parquet, uri, f"bench-new-{job}", numba_cache) for job in (1, 2))
    check_stored_evaluation("bench-new-2", "eval_model_train")
    from fathompipe.annotations import load_coco
    coco = load_coco(ann)
    print(f"\n## bench/evaluate.py: the evaluate stage, original ({commit}) vs this tree: {len(coco.images):,} "
          f"samples, {len(coco.annotations):,} ROIs, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')} UTC\n")
    print("| part | original (s) | new, first job (s) | new, later jobs (s) |\n|---|---|---|---|")
    for label, old, new in ROWS:
        a = f"{sum(original[k] for k in old):.1f}" if old else "(none)"
        print(f"| {label} | {a} | {sum(first[k] for k in new):.1f} | {sum(later[k] for k in new):.1f} |")
    total, total_first, total_later = sum(original.values()), sum(first.values()), sum(later.values())
    print(f"| **whole stage** | **{total:.1f}** | **{total_first:.1f}** | **{total_later:.1f}** |")
    print(f"\nnew stage {total / total_later:.1f}x faster than the original in a later job, {total / total_first:.1f}x "
          f"in the first (numba compiling the 2-D map), with mistakenness, the expected-distance rule, three review "
          f"views and the embeddings map added; stored evaluation checked against sklearn")


def imports(ann: Path, parquet: Path) -> None:
    """The import paths of fiftyone_io against FiftyOne's bulk API by hand and the per-sample loop users run."""
    import fiftyone as fo
    from fathompipe.annotations import load_coco
    from fathompipe.evaluation import fiftyone_io
    from fathompipe.predictions import read_predictions

    coco, preds = load_coco(ann), read_predictions(parquet)
    values = fiftyone_io.RoiValues.of(coco, preds)
    label_of = dict(zip(preds.annotation_id.tolist(), preds.concept_name.tolist()))
    confidence_of = dict(zip(preds.annotation_id.tolist(), preds.confidence.tolist()))
    rows = []
    t0 = time.perf_counter()
    ds = fiftyone_io.ingest("bench-raw", coco, "/data/train", "train", "file_name")
    rows.append((f"fathompipe ingest of {len(coco.images):,} images / {len(coco.annotations):,} boxes "
                 f"({'raw insert_many' if fiftyone_io.raw_writes_allowed() else 'add_samples'})",
                 time.perf_counter() - t0))
    public = ds.clone("bench-public")
    timed = {}
    for name, target, raw in (("raw", ds, True), ("public", public, False)):
        t0 = time.perf_counter()
        result = fiftyone_io.import_predictions(target, "train", values, "model_predictions", True, raw=raw)
        timed[name] = time.perf_counter() - t0
        what = "raw bulk write (open-source, direct MongoDB)" if raw else \
            "public API: values + set_values (any connection)"
        rows.append((f"fathompipe import of {result.written:,} predictions, {what}", timed[name]))
    n = result.written
    for name, target, raw in (("raw", ds, True), ("public", public, False)):
        t0 = time.perf_counter()
        fiftyone_io.import_predictions(target, "train", values, "model_predictions", True, raw=raw)
        rows.append((f"fathompipe re-import in place ({name}: ids, tags, attributes kept)", time.perf_counter() - t0))
    assert ds.count("model_predictions.detections") == public.count("model_predictions.detections") == n

    t0 = time.perf_counter()  # FiftyOne's own bulk API as a user would write it: replaces the field, keeps nothing
    gt = ds.values("ground_truth.detections")
    bulk_values = [fo.Detections(detections=[fo.Detection(label=label_of[d.annotation_id], bounding_box=d.bounding_box,
                                                          annotation_id=d.annotation_id,
                                                          confidence=float(confidence_of[d.annotation_id]))
                                             for d in dets]) for dets in gt]
    ds.set_values("bulk_predictions", bulk_values)
    bulk = time.perf_counter() - t0
    rows.append(("FiftyOne's bulk API by hand: values + Detection objects + one set_values", bulk))

    clone = ds.clone("bench-loop")
    t0 = time.perf_counter()
    for sample in clone.iter_samples(progress=False):  # what users run today
        sample["loop_predictions"] = fo.Detections(detections=[
            fo.Detection(label=label_of[d.annotation_id], bounding_box=d.bounding_box,
                         confidence=float(confidence_of[d.annotation_id]), annotation_id=d.annotation_id)
            for d in sample.ground_truth.detections])
        sample.save()
    loop = time.perf_counter() - t0
    rows.append(("per-sample sample.save() loop", loop))

    print(f"\n## bench/evaluate.py --imports: {len(coco.images):,} samples, {n:,} predictions, "
          f"{os.cpu_count()} cores\n")
    print("| step | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"\nagainst the per-sample loop: raw path {loop / timed['raw']:.1f}x, public-API path "
          f"{loop / timed['public']:.1f}x, FiftyOne's bulk API by hand {loop / bulk:.1f}x faster; "
          f"raw path {timed['public'] / timed['raw']:.1f}x faster than the public-API path")


if __name__ == "__main__":
    main()
