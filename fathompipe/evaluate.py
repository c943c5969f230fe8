"""Evaluate stage: score predictions with the competition metric, write a report, load FiftyOne.

    python -m fathompipe.evaluate --annotations A --predictions P.csv|P.parquet --report-dir R
        [--dataset NAME] [--field model_predictions] [--no-fiftyone] [--images-dir D] [--split test]

The report (metrics.json, per_class.csv, confusions.csv, PNG plots, report.html) is written first,
then FiftyOne is updated; a completion marker `evaluate.done` is written last. A rerun redoes only
what is missing, and a re-import replaces the predictions field rather than adding to it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import atomic
from .annotations import AnnotationError, load_coco
from .config import redact
from .fiftyone_io import FiftyOneSetupError
from .report import evaluate as score
from .report import headline, load_predictions, write_report


def run(annotations: str | Path, predictions: str | Path, report_dir: str | Path, split: str = "test",
        images_dir: Optional[str] = None, naming: str = "file_name", use_fiftyone: bool = True,
        dataset_name: str = "fathomnet-2025", field: str = "model_predictions", eval_key: str = "eval_model",
        database_uri: Optional[str] = None) -> Dict[str, object]:
    """The stage (the callable the driver submits)."""
    t0 = time.monotonic()
    out = Path(report_dir)
    dataset = load_coco(annotations)
    preds = load_predictions(predictions)
    ev = score(dataset, preds)
    extra = {"annotations": str(annotations), "predictions": str(predictions), "split": split}
    report = write_report(ev, dataset, out, f"FathomNet 2025 winner on the {split} split",
                          Path(images_dir) if images_dir else None, naming, extra)
    print(f"report: {report}\n{split}: {headline(ev.metrics)}", flush=True)
    result: Dict[str, object] = {"report": str(report), "metrics": str(out / "metrics.json"),
                                 "headline": headline(ev.metrics)}
    if use_fiftyone:
        result["fiftyone"] = load_fiftyone(dataset, preds, ev.metrics["labelled"], split, images_dir or "", naming,
                                           dataset_name, field, eval_key, database_uri)
    result["seconds"] = round(time.monotonic() - t0, 1)
    atomic.write_json(out / "evaluate.done", result)
    return result


def load_fiftyone(dataset, preds, labelled: bool, split: str, images_dir: str, naming: str, name: str, field: str,
                  eval_key: str, database_uri: Optional[str]) -> Dict[str, object]:
    from . import fiftyone_io
    fiftyone_io.configure(database_uri)
    uri = database_uri or os.environ.get("FIFTYONE_DATABASE_URI")
    where = f"the MongoDB at {redact({'uri': uri})['uri']}" if uri else "FiftyOne's bundled database"
    try:
        t0 = time.monotonic()
        ds = fiftyone_io.ingest(name, dataset, images_dir, split, naming)
        n = fiftyone_io.import_predictions(ds, preds, field, labelled)
        info: Dict[str, object] = {**fiftyone_io.summary(ds, field), "field": field, "imported": n,
                                   "import_seconds": round(time.monotonic() - t0, 1)}
        if labelled:
            info.update(fiftyone_io.evaluate_in_app(ds, field, split, eval_key))
    except Exception as exc:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in (  # FiftyOne raises ConnectionError
                "ServerSelectionTimeoutError", "ConnectionFailure", "ServiceListenTimeout", "AutoReconnect",
                "NetworkTimeout"):
            raise FiftyOneSetupError(f"cannot reach {where}: {type(exc).__name__}. The report is written; check that "
                                     f"the database is up and reachable from this node, then rerun the evaluate stage "
                                     f"(python -m fathompipe.resubmit --run-dir R --stage evaluate)") from None
        raise
    print(f"FiftyOne dataset '{name}' in {where}: {info['imported']} predictions in field '{field}'"
          + (f", evaluation '{eval_key}', saved view '{info['saved_view']}'" if labelled else "")
          + f"\n{fiftyone_io.app_instructions(name)}", flush=True)
    return info


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--predictions", required=True, help="predictions.csv or predictions.parquet")
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--images-dir", help="for crops in the report and FiftyOne file paths")
    parser.add_argument("--naming", choices=["file_name", "image_id"], default="file_name")
    parser.add_argument("--dataset", default="fathomnet-2025")
    parser.add_argument("--field", default="model_predictions")
    parser.add_argument("--eval-key", default="eval_model")
    parser.add_argument("--database-uri", help="external MongoDB (default: FiftyOne's bundled database)")
    parser.add_argument("--no-fiftyone", action="store_true")
    args = parser.parse_args(argv)
    try:
        run(args.annotations, args.predictions, args.report_dir, args.split, args.images_dir, args.naming,
            not args.no_fiftyone, args.dataset, args.field, args.eval_key, args.database_uri)
    except (AnnotationError, FiftyOneSetupError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
