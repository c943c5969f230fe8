"""The App screenshots in docs/app/, as a researcher sees them, in headless Chromium.

    .venv/bin/python docs/app/shoot.py --set demo     # the offline demo (python -m demo): demo-*.png
    .venv/bin/python docs/app/shoot.py --set train    # train-sized synthetic set (23,699 ROIs): train-*.png

Needs Debian's `chromium` and playwright (the test extra). Starts a private mongod (support/mongod.py), builds the
set (the demo's own run, or the researchers' dataset schema with model-like logits, no images), runs the evaluate
stage, opens the App on 127.0.0.1 with FiftyOne's launch_app and takes: the Model Evaluation panel (Summary, then the
confusion matrix), the mistakenness view and the view where the expected-distance rule answers otherwise, with
truth, prediction, confidence, mistakenness and the rule's label shown on each patch (the browser storage entry of
fiftyone_review.shown_label_attributes, as the App command seeds it), and report.html's per-class table sorted
by "rule - argmax". Prints the stage's figures of the expected-distance rule.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def build_demo(work: Path) -> tuple:
    subprocess.run([sys.executable, "-m", "demo", "--run-dir", str(work / "demo")], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return "fathompipe-demo", work / "demo" / "evaluate" / "train"


def build_train(work: Path) -> tuple:
    import numpy as np
    import pandas as pd

    from fathompipe.config import EvaluateConfig
    from fathompipe.evaluate import run
    from fathompipe.jobs import EvaluateSplit
    from researchers_dataset import ingest_like_researchers
    from support.synthetic import model_like_logits, train_like_coco

    data = ROOT / "fathompipe" / "data"
    coco = train_like_coco(data / "train_annotation_labels.csv", data / "dataset_test.json", work / "train.json")
    ids, logits = model_like_logits(coco, seed=0)
    names = [c["name"] for c in sorted(json.loads(coco.read_text())["categories"], key=lambda c: c["id"])]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pd.DataFrame({"annotation_id": ids, "concept_name": np.array(names)[logits.argmax(1)], "confidence": p.max(1),
                  "logits": list(logits)}).to_parquet(work / "predictions.parquet")
    ingest_like_researchers("fathomnet-2025", {"train": coco})
    run(EvaluateSplit(str(coco), str(work / "predictions.parquet"), str(work / "report"), "train", "/unused"),
        EvaluateConfig(dataset="fathomnet-2025"))
    return "fathomnet-2025", work / "report"


def shoot_report(report: Path, out: Path, prefix: str) -> None:
    """report.html's per-class table sorted by "rule - argmax", most negative (where the rule helps most) first."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.goto(report.as_uri())
        header = page.locator("h2:has-text('Per class') + p + table th", has_text="\u2212")  # "rule − argmax"
        header.click()
        header.click()  # numbers sort largest first; the second click: smallest (most negative) first
        page.locator("h2:has-text('Per class')").first.evaluate("h => window.scrollTo(0, h.offsetTop - 10)")
        page.screenshot(path=str(out / f"{prefix}-report-per-class-sorted.png"))
        browser.close()


def shoot(name: str, out: Path, prefix: str) -> None:
    import fiftyone as fo
    from playwright.sync_api import sync_playwright

    from fathompipe.evaluation.fiftyone_review import seed_script, shown_label_attributes

    ds = fo.load_dataset(name)
    session = fo.launch_app(ds.load_saved_view("eval_model_train-mistakenness"), remote=True, address="127.0.0.1",
                            port=5181, auto=False)
    base = f"http://127.0.0.1:5181/datasets/{name}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        page.add_init_script(seed_script(shown_label_attributes(ds)))

        first = [True]

        def open_page(url: str) -> None:
            page.goto(url)
            if first[0]:  # the Enterprise advertisement, once per browser
                page.get_by_text("Dismiss").click(timeout=120_000)
                first[0] = False
            time.sleep(30)  # the grid of 23,699 patches renders slowly on 2 cores

        open_page(base)  # on the session's view: the mistakenness view
        page.screenshot(path=str(out / f"{prefix}-mistakenness.png"))
        session.view = ds.load_saved_view("eval_model_train-rule-differs")  # a browser is connected: it follows
        time.sleep(30)
        page.screenshot(path=str(out / f"{prefix}-rule-differs.png"))
        session.view = None
        time.sleep(5)
        page.get_by_title("New panel").first.click()
        page.get_by_text("Model Evaluation").first.click()
        page.get_by_text("eval_model_train", exact=True).locator("visible=true").first.click(timeout=60_000)
        time.sleep(8)
        page.screenshot(path=str(out / f"{prefix}-model-evaluation-summary.png"))
        page.get_by_text("Summary", exact=True).locator("visible=true").first.click()
        page.get_by_text("Confusion Matrices").first.click()
        time.sleep(5)
        page.screenshot(path=str(out / f"{prefix}-model-evaluation-matrix.png"))
        browser.close()
    session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=("demo", "train"), required=True)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    from support.mongod import PrivateMongod

    mongod = PrivateMongod()
    os.environ.update({"FIFTYONE_DATABASE_URI": mongod.uri, "FIFTYONE_DATABASE_NAME": "fathompipe-shots",
                       "FIFTYONE_DATABASE_VALIDATION": "false", "FIFTYONE_DO_NOT_TRACK": "true"})
    try:
        with tempfile.TemporaryDirectory(prefix="fathompipe-shots-") as work:
            name, report = (build_demo if args.set == "demo" else build_train)(Path(work))
            metrics = json.loads((report / "metrics.json").read_text())
            shoot_report(report / "report.html", Path(args.out), args.set)
            shoot(name, Path(args.out), args.set)
    finally:
        mongod.stop()
    rule = metrics.get("expected_distance_rule", {})
    print(json.dumps({"set": args.set, "n_annotations": metrics["n_annotations"],
                      "mean_hierarchical_distance_argmax": rule.get("mean_hierarchical_distance_argmax"),
                      "mean_hierarchical_distance_rule": rule.get("mean_hierarchical_distance_rule"),
                      "competition_score_argmax": metrics.get("mean_hierarchical_distance"),
                      "competition_score_rule": rule.get("competition_score_rule"),
                      "n_differ": rule.get("n_differ"), "n_better": rule.get("n_better"),
                      "n_worse": rule.get("n_worse"), "accuracy_argmax": rule.get("accuracy_argmax"),
                      "accuracy_rule": rule.get("accuracy_rule"),
                      "expected_distance_argmax": rule.get("expected_distance_argmax"),
                      "expected_distance_rule": rule.get("expected_distance_rule")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
