"""Evaluate stage: score predictions with the competition metric, write a report, load FiftyOne.

    python -m fathompipe.evaluate --annotations A --predictions P.csv|P.parquet --report-dir R
        [--split test] [--dataset NAME] [--field model_predictions] [--images-dir D] [--no-fiftyone]
        [--database-uri mongodb://... | --database-dir D [--database-cache-gb G]] [--deployment NAME]
        [--env-file .env]

The report (metrics.json, per_class.csv, confusions.csv, rois.csv, report.html) is written first,
then FiftyOne is updated; a completion marker `evaluate.done` is written last. The Slurm stage runs
every selected split in turn in one job (`run_job`); a rerun skips splits already done, and a
re-import updates the split's predictions in place (review tags and attributes kept).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from fathompipe import atomic
from fathompipe.annotations import AnnotationError, load_coco
from fathompipe.cli import add_options, from_args
from fathompipe.config import EvaluateConfig
from fathompipe.evaluation import fiftyone_eval, fiftyone_review
from fathompipe.evaluation.fiftyone_env import FiftyOneSetupError
from fathompipe.evaluation.fiftyone_io import FiftyOneDataError
from fathompipe.evaluation.report import write_report, write_rule_csv
from fathompipe.evaluation.scoring import headline, score
from fathompipe.jobs import EvaluateJob, EvaluateSplit
from fathompipe.layout import evaluate_marker
from fathompipe.measure import Parts
from fathompipe.predictions import read_predictions


def run(split: EvaluateSplit, options: Optional[EvaluateConfig] = None) -> Dict[str, object]:
    """One split: report, then FiftyOne (unless `options.fiftyone` is off), then the completion marker."""
    options = options or EvaluateConfig()
    t0 = time.monotonic()
    out = Path(split.report_dir)
    parts = Parts(f"evaluate {split.split}")
    with parts.part("load"):
        dataset = load_coco(split.annotations)  # a run's annotation table: its columns, no JSON parse
        preds = read_predictions(split.predictions)  # compact columns; the logits stay in the parquet
    with parts.part("score"):
        ev = score(dataset, preds)
    extra = {"annotations": split.annotations, "predictions": split.predictions, "split": split.split}
    with parts.part("report"):
        report = write_report(ev, dataset, out, f"FathomNet 2025 winner on the {split.split} split",
                              Path(split.images_dir) if split.images_dir else None, split.naming, extra)
    print(f"report: {report}\n{split.split}: {headline(ev.metrics)}", flush=True)
    if options.expected_distance_csv:  # opt-in: the rule's answers in the competition's format (report.py)
        print(f"expected-distance rule's competition CSV: {write_rule_csv(ev, out)}", flush=True)
    metrics = ev.metrics
    result: Dict[str, object] = {"report": str(report), "metrics": str(out / "metrics.json"),
                                 "headline": headline(metrics)}
    if options.fiftyone:
        from fathompipe.evaluation.fiftyone_io import RoiValues
        values = RoiValues.of(dataset, preds, ev.table)
        del ev  # the per-ROI table: what FiftyOne needs of it is in `values`
        result["fiftyone"] = load_fiftyone(dataset, values, bool(metrics["labelled"]), split, options,
                                           fiftyone_review.embeddings_beside(Path(split.predictions)),
                                           fiftyone_eval.extras(metrics), parts)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["parts"] = parts.parts
    atomic.write_json(evaluate_marker(out), result)
    return result


def connect(options: EvaluateConfig) -> str:
    """Choose FiftyOne's database for this process (before fiftyone is imported); returns where, for logs. The
    private database, when used, is started here (or joined) with a cache sized from the job's memory, and left
    when the process exits (the last user stops mongod)."""
    from fathompipe.evaluation import fiftyone_env, private_database
    cache_gb = options.database_cache_gb or private_database.cache_gb_for(options.resources.mem_gb)
    return fiftyone_env.describe(fiftyone_env.configure(options.database_uri, options.deployment, options.env_file,
                                                        options.database_dir, cache_gb))


def load_fiftyone(dataset, values, labelled: bool, inputs: EvaluateSplit, options: EvaluateConfig,
                  embeddings: Optional[Path] = None, more: Optional[fiftyone_eval.Extras] = None,
                  parts: Optional[Parts] = None) -> Dict[str, object]:
    """Ingest the split's missing images, write the predictions (`values`: fiftyone_io.RoiValues), store the
    evaluation and the review views (labelled splits) and the embeddings map."""
    from fathompipe.evaluation import fiftyone_io
    where = connect(options)
    name, field, split = options.dataset, options.field, inputs.split
    eval_key = f"{options.eval_key}_{split}"
    try:
        parts = parts or Parts(f"evaluate {split}")
        t0 = time.monotonic()
        with parts.part("fiftyone ingest"):
            ds = fiftyone_io.ingest(name, dataset, inputs.images_dir or "", split, inputs.naming)
        with parts.part("fiftyone import"):
            imported = fiftyone_io.import_predictions(ds, split, values, field, labelled)
        info: Dict[str, object] = {**fiftyone_io.summary(ds, field, split), "split": split, "field": field,
                                   "imported": imported.written, "unmatched": imported.unmatched,
                                   "write_path": "raw bulk write" if imported.raw else "public API (set_values)",
                                   "import_seconds": round(time.monotonic() - t0, 1)}
        if labelled:
            with parts.part("fiftyone evaluation and views"):
                info.update(fiftyone_io.evaluate_in_app(ds, field, split, eval_key, values, more=more))
        if embeddings is not None:
            with parts.part("embeddings map"):
                info.update(fiftyone_review.visualize(ds, fiftyone_io.split_view(ds, split), embeddings,
                                                      fiftyone_review.brain_key(eval_key)))
    except Exception as exc:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in (  # FiftyOne raises ConnectionError
                "ServerSelectionTimeoutError", "ConnectionFailure", "ServiceListenTimeout", "AutoReconnect",
                "NetworkTimeout"):
            raise FiftyOneSetupError(f"cannot reach {where}: {type(exc).__name__}. The report is written; check that "
                                     f"the database is up and reachable from this node, then rerun the evaluate stage "
                                     f"(python -m fathompipe.resubmit --run-dir R --stage evaluate)") from None
        raise
    info["app_command"] = fiftyone_io.app_command(name, info.get("saved_view"), options.database_dir)
    print(f"FiftyOne dataset '{name}' in {where}, split {split} ({info['samples']:,} samples): {info['imported']:,} "
          f"predictions in field '{field}' ({info['write_path']})"
          + (f", evaluation '{eval_key}', saved views '{info['saved_view']}' (truth beside prediction, most "
             f"confident first) and '{info['mistakenness_view']}'" if labelled else "")
          + (f", '{info['rule_view']}' (where the expected-distance rule answers otherwise)"
             if info.get("rule_view") else "")
          + (f", embeddings visualization '{info['brain_key']}' ({info['visualization']}, {info['embedded_rois']} "
             f"ROIs; in the App's Embeddings panel pick it, then colour by ground_truth.detections.label)"
             if info.get("brain_key") else "")
          + (f"; {imported.unmatched} predictions have no ground-truth detection in the dataset (not written)"
             if imported.unmatched else "")
          + f"\n{fiftyone_io.app_instructions(name, info.get('saved_view'), options.database_dir)}", flush=True)
    return info


def run_job(job: EvaluateJob) -> Dict[str, object]:
    """Every split in turn in ONE process, so FiftyOne's bundled database is started once, never twice
    on one directory; a split with its completion marker is skipped."""
    results: Dict[str, object] = {}
    for split in job.splits:
        marker = evaluate_marker(split.report_dir)
        if marker.exists():
            print(f"{split.split}: already evaluated ({marker})", flush=True)
            continue
        results[split.split] = run(split, job.options)
    return results


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.evaluate", description=__doc__.split("\n\n")[0])
    add_options(parser, EvaluateSplit)
    add_options(parser, EvaluateConfig)
    args = parser.parse_args(argv)
    try:
        run(from_args(EvaluateSplit, args), from_args(EvaluateConfig, args))
    except (AnnotationError, FiftyOneSetupError, FiftyOneDataError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
