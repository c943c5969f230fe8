"""The App screenshots in docs/app/, as a researcher sees them, in headless Chromium.

    .venv/bin/python docs/app/shoot.py --set demo     # the offline demo (python -m demo): demo-*.png
    .venv/bin/python docs/app/shoot.py --set train    # train-sized synthetic set (23,699 ROIs): train-*.png
    .venv/bin/python docs/app/shoot.py --set scale [--rois 200000]   # a deployment-like set: scale-*.png

Needs Debian's `chromium` and playwright (the test extra). Starts a private mongod (support/mongod.py), builds the
set (the demo's own run, or the researchers' dataset schema with model-like logits, no images), runs the evaluate
stage, opens the App on 127.0.0.1 with FiftyOne's launch_app and takes: the Model Evaluation panel (Summary, then the
confusion matrix), the mistakenness view and the view where the expected-distance rule answers otherwise, with
truth, prediction, confidence, mistakenness and the rule's label shown on each patch (the browser storage entry of
fiftyone_review.shown_label_attributes, as the App command seeds it), and report.html's per-class table sorted
by "rule - argmax". Prints the stage's figures of the expected-distance rule.
The scale set is a production-like split (support/synthetic.py, no image files: each patch shows the App's
missing-image mark) with the infer stage's merged outputs, evaluated by `python -m fathompipe.evaluate` as a job runs
it; it is opened as a researcher opens it, through the token URL `python -m fathompipe.app` prints, on the
disagreements view (label attributes seeded by the App command, no clicks) and then its Embeddings panel.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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


def build_scale(work: Path, rois: int) -> tuple:
    from fathompipe.annotations import load_coco
    from fathompipe.evaluation.taxonomy import load_taxonomy
    from fathompipe.layout import OutputFiles
    from fathompipe.predictions import merge
    from support.synthetic import model_like_parts, production_like_coco

    annotations = production_like_coco(work / "deployment.json", rois)
    coco = load_coco(annotations)
    out = OutputFiles(work / "infer" / "predictions.csv")
    model_like_parts(coco, out)
    merge(coco, out, list(load_taxonomy()), 1, "train")
    subprocess.run([sys.executable, "-m", "fathompipe.evaluate", "--annotations", str(annotations), "--predictions",
                    str(out.parquet), "--report-dir", str(work / "report"), "--split", "train", "--dataset",
                    "fathomnet-2025", "--database-uri", os.environ["FIFTYONE_DATABASE_URI"]], cwd=ROOT, check=True)
    return "fathomnet-2025", work / "report"


def shoot_app_command(name: str, out: Path, prefix: str) -> None:
    """The disagreements view and its Embeddings panel (coloured by true label) through the App command's URL."""
    from playwright.sync_api import sync_playwright

    app = subprocess.Popen([sys.executable, "-m", "fathompipe.app", "--dataset", name, "--view",
                            "eval_model_train-disagreements", "--port", "5183"], cwd=ROOT, stdout=subprocess.PIPE,
                           text=True)
    try:
        url = next(line.split()[-1] for line in app.stdout if line.strip().startswith("open:"))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=[a for a in CHROMIUM_ARGS if a != "--disable-gpu"]
                                        + ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
            page = browser.new_page(viewport={"width": 1800, "height": 1100})
            t0 = time.monotonic()
            page.goto(url)
            page.get_by_text("Dismiss").click(timeout=300_000)  # the Enterprise advertisement, over the grid
            page.get_by_text(re.compile(r"^[\d,]+ patches$")).first.wait_for(timeout=300_000)  # the grid's count
            time.sleep(20)
            print(f"disagreements view on screen {time.monotonic() - t0:.0f} s after the URL was opened")
            page.screenshot(path=str(out / f"{prefix}-disagreements.png"))
            try:
                page.get_by_title("New panel").first.click()
                page.get_by_text("Embeddings", exact=True).first.click()
                page.get_by_text("eval_model_train_embeddings", exact=True).first.click(timeout=60_000)
                time.sleep(10)
                page.get_by_text("Color by").first.click(timeout=60_000)
                page.get_by_text("ground_truth.detections.label", exact=True).first.click()
            except Exception:
                page.screenshot(path=str(out / f"{prefix}-failed.png"))  # where it stopped
                raise
            time.sleep(60)  # every ROI's point, drawn by WebGL in software
            page.screenshot(path=str(out / f"{prefix}-embeddings.png"))
            browser.close()
    finally:
        app.terminate()
        app.wait(60)


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
    parser.add_argument("--set", choices=("demo", "train", "scale"), required=True)
    parser.add_argument("--rois", type=int, default=200_000, help="the scale set's ROIs (default %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    from support.mongod import PrivateMongod

    mongod = PrivateMongod()
    os.environ.update({"FIFTYONE_DATABASE_URI": mongod.uri, "FIFTYONE_DATABASE_NAME": "fathompipe-shots",
                       "FIFTYONE_DATABASE_VALIDATION": "false", "FIFTYONE_DO_NOT_TRACK": "true"})
    try:
        with tempfile.TemporaryDirectory(prefix="fathompipe-shots-") as work:
            if args.set == "scale":
                name, report = build_scale(Path(work), args.rois)
                shoot_app_command(name, Path(args.out), args.set)
            else:
                name, report = (build_demo if args.set == "demo" else build_train)(Path(work))
                shoot_report(report / "report.html", Path(args.out), args.set)
                shoot(name, Path(args.out), args.set)
            metrics = json.loads((report / "metrics.json").read_text())
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
