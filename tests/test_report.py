"""Scoring and the report: mistakenness as FiftyOne Brain defines it, the honest headline, a readable page."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import DATA, IN_CI, PARITY
from fathompipe.annotations import load_coco
from fathompipe.config import EvaluateConfig
from fathompipe.evaluate import run as evaluate_stage
from fathompipe.jobs import EvaluateSplit
from fathompipe.config import InferConfig, SplitSource
from fathompipe.jobs import InferJob
from fathompipe.infer import run as infer
from fathompipe.layout import OutputFiles
from fathompipe.predictions import read_predictions
from fathompipe.evaluation.scoring import (headline, mistakenness,
                                           mistakenness_from_confidence, per_class, score)
from fathompipe.evaluation.report import write_report
from support.synthetic import model_like_logits, train_like_coco
from fathompipe.evaluation.taxonomy import taxonomic_order
from fathompipe.evaluation.metric import distance


def test_mistakenness_equals_fiftyone_brain(fiftyone_db):
    """The Brain's compute_mistakenness on a classification dataset, with logits and with confidences."""
    import fiftyone as fo
    import fiftyone.brain as fob

    rng = np.random.default_rng(1)
    classes = ["a", "b", "c", "d", "e"]
    logits = rng.normal(0, 1, (60, 5)) * rng.choice([0.1, 1, 5, 30], size=(60, 1))  # from uniform to certain
    truth = rng.integers(0, 5, 60)
    pred = logits.argmax(1)
    pred[:5] = (truth[:5] + 1) % 5  # some disagreements whatever the logits say
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence = p.max(1)
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=f"/nowhere/{i}.png", gt=fo.Classification(label=classes[truth[i]]),
                              pred=fo.Classification(label=classes[pred[i]], logits=logits[i].tolist(),
                                                     confidence=float(confidence[i]))) for i in range(60)])
    fob.compute_mistakenness(ds, "pred", label_field="gt", mistakenness_field="m_logits", use_logits=True,
                             progress=False)
    fob.compute_mistakenness(ds, "pred", label_field="gt", mistakenness_field="m_conf", use_logits=False,
                             progress=False)
    correct = truth == pred
    ours = mistakenness(logits, correct)
    assert np.allclose(ours, ds.values("m_logits"), rtol=0, atol=1e-12)
    assert np.allclose(mistakenness_from_confidence(confidence, correct), ds.values("m_conf"), rtol=0, atol=1e-12)
    assert ours[~correct].min() > 0.5 > ours[correct].max()  # a disagreement always ranks above an agreement
    ds.delete()


def test_per_class_equals_sklearn():
    from sklearn.metrics import precision_recall_fscore_support
    names = taxonomic_order()
    rng = np.random.default_rng(2)
    truth = [names[i] for i in rng.integers(0, 40, 3000)]  # classes 40..78 never occur: zero support
    pred = [t if rng.random() < 0.6 else (None if rng.random() < 0.05 else names[rng.integers(0, 79)])
            for t in truth]
    index = {n: i for i, n in enumerate(names)}
    ours = per_class(names, np.asarray([index[t] for t in truth]), np.asarray([index.get(p, -1) for p in pred]),
                     np.zeros(len(truth)))
    table = pd.DataFrame({"truth": truth, "prediction": pred})
    p, r, f, s = precision_recall_fscore_support(truth, table.prediction.fillna("(none)"), labels=names,
                                                 zero_division=0)
    assert np.allclose(ours.precision, p) and np.allclose(ours.recall, r) and np.allclose(ours.f1, f)
    assert ours.support.tolist() == s.tolist()


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """The real infer stage on the parity fixture with one image missing, and the fixture's annotations
    labelled (it has no labels): half with the model's own answer, half with another class."""
    d = tmp_path_factory.mktemp("parity")
    images = d / "images"
    shutil.copytree(PARITY / "images", images)
    data = json.loads((PARITY / "dataset.json").read_text())
    gone = data["images"][0]
    (images / gone["file_name"]).unlink()
    ckpt = d / "ckpt" / "model.ckpt"
    ckpt.parent.mkdir()
    shutil.copyfile(PARITY / "model.ckpt", ckpt)
    out = d / "infer" / "predictions.csv"
    infer(InferJob(SplitSource(str(PARITY / "dataset.json"), str(images)), str(ckpt), str(out),
                   InferConfig(device="cpu", precision="fp32", num_workers=0, batch_size=8,
                               encoder_config=str(PARITY / "tiny_dinov2_config.json"))), progress=False)
    predicted = dict(line.split(",", 1) for line in out.read_text().splitlines()[1:])
    ids = {c["name"]: c["id"] for c in data["categories"]}
    for i, a in enumerate(data["annotations"]):
        name = predicted.get(str(a["id"]), "Farrea")
        a["category_id"] = ids[name] if i % 2 == 0 else ids["Farrea" if name != "Farrea" else "Serpulidae"]
    labelled = d / "labelled.json"
    labelled.write_text(json.dumps(data))
    lost = {a["id"] for a in data["annotations"] if a["image_id"] == gone["id"]}
    return labelled, out, images, lost


def test_headline_scores_the_predicted_rois_beside_the_competition_rule(parity_run, tmp_path):
    labelled, out, images, lost = parity_run
    result = evaluate_stage(EvaluateSplit(str(labelled), str(out.with_suffix(".parquet")), str(tmp_path / "r"), "train",
                                          str(images)), EvaluateConfig(fiftyone=False))
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    rois = pd.read_csv(tmp_path / "r" / "rois.csv", keep_default_na=False)
    assert m["n_annotations"] == 30 and m["n_predictions"] == 30 - len(lost) and len(lost) > 0
    assert m["coverage"] == pytest.approx((30 - len(lost)) / 30)
    assert m["not_predicted"] == {"image missing": len(lost)}
    assert set(rois.annotation_id[rois.prediction == ""]) == lost
    assert all(r.startswith("image missing: ") for r in rois.not_predicted[rois.prediction == ""])
    predicted = rois[rois.prediction != ""]
    assert m["predicted_only"]["mean_hierarchical_distance"] == pytest.approx(predicted.distance.mean())
    assert m["predicted_only"]["accuracy"] == pytest.approx((predicted.truth == predicted.prediction).mean())
    assert m["mean_hierarchical_distance"] == pytest.approx((predicted.distance.sum() + 12 * len(lost)) / 30)
    line = result["headline"]
    assert f"{m['predicted_only']['mean_hierarchical_distance']:.3f}" in line
    assert f"{m['mean_hierarchical_distance']:.3f}" in line and f"{len(lost)} image missing" in line
    page = (tmp_path / "r" / "report.html").read_text()
    assert "coverage" in page and f"{len(lost)} image missing" in page and "scores 12" in page


def test_scores_in_small_chunks_equal_the_whole(parity_run, monkeypatch, tmp_path):
    """The logits are read and scored in chunks (predictions.CHUNK rows): any chunking gives the same table and
    metrics as one chunk; rois.csv written in slices is the same file."""
    from fathompipe import predictions as predictions_module
    from fathompipe.evaluation import report as report_module

    labelled, out, _, _ = parity_run
    whole = score(load_coco(labelled), read_predictions(out.with_suffix(".parquet")))
    monkeypatch.setattr(predictions_module, "CHUNK", 4)
    chunked = score(load_coco(labelled), read_predictions(out.with_suffix(".parquet")))
    pd.testing.assert_frame_equal(whole.table, chunked.table)
    assert json.dumps(whole.metrics, sort_keys=True) == json.dumps(chunked.metrics, sort_keys=True)
    assert "expected_distance_rule" in whole.metrics and whole.metrics["mistakenness_from"] == "logits"
    coco = load_coco(labelled)
    one = write_report(whole, coco, tmp_path / "one", "t").parent / "rois.csv"
    monkeypatch.setattr(report_module, "CSV_ROWS", 7)  # rois.csv in slices of 7 rows: the same file
    sliced = write_report(whole, coco, tmp_path / "sliced", "t").parent / "rois.csv"
    assert sliced.read_text() == one.read_text() and len(one.read_text().splitlines()) == 1 + len(whole.table)


def test_mistakenness_comes_from_the_saved_logits(parity_run, tmp_path):
    labelled, out, _, _ = parity_run
    preds = read_predictions(out.with_suffix(".parquet"))
    ev = score(load_coco(labelled), preds)
    assert ev.metrics["mistakenness_from"] == "logits"
    t = ev.table.dropna(subset=["prediction"]).set_index("annotation_id")
    logits = np.stack(pd.read_parquet(out.with_suffix(".parquet")).set_index("annotation_id").loc[t.index, "logits"])
    assert np.allclose(t.mistakenness, mistakenness(logits, t.correct.to_numpy()))
    assert (t.mistakenness[~t.correct] > 0.5).all() and (t.mistakenness[t.correct] < 0.5).all()
    assert ev.table.mistakenness[ev.table.prediction.isna()].isna().all()  # no prediction, no score
    csv_only = read_predictions(out)  # the competition CSV has neither logits nor confidences
    assert score(load_coco(labelled), csv_only).metrics["mistakenness_from"] is None


@pytest.fixture(scope="module")
def train_sized(tmp_path_factory):
    """23,699 ROIs over 79 classes (the real train split's ids and labels, synthetic boxes) with
    model-like logits: mostly right, confusions mostly between taxonomic neighbours; 1% skipped."""
    d = tmp_path_factory.mktemp("train")
    ann = train_like_coco(DATA / "train_annotation_labels.csv", DATA / "dataset_test.json", d / "train.json")
    ds = load_coco(ann)
    names = ds.class_names()
    ids, logits = model_like_logits(ann, seed=0)
    keep = np.random.default_rng(1).random(len(ids)) >= 0.01
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    preds = pd.DataFrame({"annotation_id": ids[keep], "concept_name": np.array(names)[logits.argmax(1)][keep],
                          "confidence": p.max(1)[keep], "logits": list(logits[keep])})
    preds.to_parquet(d / "predictions.parquet")
    skipped = [(a.id, a.image_id, f"image missing: {ds.images[a.image_id].file_name}")
               for a, k in zip(ds.iter_annotations(), keep) if not k]
    pd.DataFrame(skipped, columns=["annotation_id", "image_id", "reason"]).to_csv(d / "predictions.skipped.csv",
                                                                                  index=False)
    images = d / "images"
    images.mkdir()
    one = d / "one.png"  # every image is 1920x1080: one file, linked under a third of the names
    Image.new("RGB", (1920, 1080), (40, 80, 120)).save(one)
    for im in list(ds.images)[::3]:  # only these images' crops appear
        os.link(one, images / im.file_name)
    return ds, d / "predictions.parquet", images, len(skipped)


def test_report_page_at_train_size(train_sized, tmp_path):
    ds, pred_path, images, n_skipped = train_sized
    ev = score(ds, read_predictions(pred_path))
    out = tmp_path / "r"
    write_report(ev, ds, out, "train", images, "file_name", {"split": "train"})
    page = (out / "report.html").read_text()
    assert not re.search(r"(?:src|href)=['\"]?https?:", page)  # opens offline: nothing fetched
    for link in re.findall(r"(?:src|href)=['\"]?([^ '\">]+)", page):
        if link.startswith("#"):
            assert f"<h2 id={link[1:]}>" in page
            continue
        target = Path(link.removeprefix("file://")) if link.startswith("file://") else out / link
        assert target.exists(), link
    # the matrix: every class named on both axes, one cell per non-zero pair, its data equal to the CSV
    names, cm = ev.matrix
    svg = page[page.index("<svg id=cm"):page.index("</svg>")]
    assert svg.count("<text class=rl") == svg.count("<text class=cl") == 79
    assert svg.count("<title>") == int((cm > 0).sum()) and cm.trace() > 0
    data = json.loads(re.search(r"const CM=(\{.*?\});</script>", page).group(1))
    csv = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert data["names"] == names == list(csv.columns) and data["cm"] == csv.to_numpy().tolist() == cm.tolist()
    assert cm.sum() == ev.metrics["n_predictions"] - ev.metrics["n_unknown_names"]
    # label-error candidates: disagreements by mistakenness, named by image file, crops where images exist
    table = page[page.index("Label-error candidates"):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr><td>(.*?)</tr>", table)
    assert len(rows) == 50
    values = [float(v) for v in re.findall(r"<td data-v=([\d.]+)>[\d.]+</td><td data-v=\d+>", table)]
    assert len(values) == 50 and values == sorted(values, reverse=True) and values[-1] > 0.5
    wrong = ev.table[ev.table.prediction.notna() & ~ev.table.correct]
    assert values[0] == pytest.approx(wrong.mistakenness.max(), abs=1e-6)
    on_disk = {p.name for p in images.iterdir()}
    for row in rows:
        file_name = re.search(r"(train-\d+\.png)", row).group(1)
        assert ("<img src=crops/" in row) == (file_name in on_disk)
    assert 0 < len(list((out / "crops").iterdir())) < 50
    for crop in (out / "crops").iterdir():
        with Image.open(crop) as im:
            assert im.size == (128, 128)
    assert f"{n_skipped} image missing" in page and "ROIs without a prediction" in page
    rois = pd.read_csv(out / "rois.csv")
    assert len(rois) == 23699 and {"file_name", "mistakenness", "not_predicted"} <= set(rois.columns)
    assert headline(ev.metrics).count("mean hierarchical distance") == 1
    assert f"{ev.metrics['n_predictions']:,} of 23,699 ROIs predicted" in headline(ev.metrics)  # thousands separated
    rule = ev.metrics["expected_distance_rule"]  # the rule over every predicted ROI, never worse in expectation
    assert rule["n"] == ev.metrics["n_predictions"]
    assert rule["expected_distance_rule"] < rule["expected_distance_argmax"]
    assert "Beyond argmax" in page and "rule &minus; argmax" in page


def test_unlabelled_split_reports_coverage_and_counts(tmp_path):
    run_dir = tmp_path / "r"
    split = EvaluateSplit(str(DATA / "dataset_test.json"), str(DATA / "winner_test_predictions.csv"), str(run_dir))
    evaluate_stage(split, EvaluateConfig(fiftyone=False))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["coverage"] == 1.0 and m["not_predicted"] == {} and "mean_hierarchical_distance" not in m
    page = (run_dir / "report.html").read_text()
    assert "no score can be computed" in page and "What the model predicted" in page and "<svg" not in page
    assert page.count("<td class=bar") == len(m["prediction_counts"])


def test_skipped_file_is_read_beside_the_predictions(tmp_path):
    files = OutputFiles(tmp_path / "predictions.csv")
    files.csv.write_text("annotation_id,concept_name\n1,Farrea\n")
    files.skipped.write_text('annotation_id,image_id,reason\n2,7,"image unreadable: OSError: truncated, sorry"\n')
    preds = read_predictions(files.csv)
    assert preds.skipped == {2: "image unreadable: OSError: truncated, sorry"}
    files.skipped.write_text("id,reason\n2,x\n")
    with pytest.raises(ValueError, match=r"predictions\.skipped\.csv: expected columns annotation_id,image_id,reason"):
        read_predictions(files.csv)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (Debian's `chromium`, driven by playwright). In CI (.ci/run installs
    both) a missing browser fails the test; elsewhere it skips."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if sync_playwright is None or binary is None:
        why = "headless Chromium needs `pip install playwright` and `apt-get install chromium`"
        if IN_CI:
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


# per sortable table, per header: click it, read the column's sort keys (data-v as numbers, else text) and check
# their order with the browser's own comparison; clicked twice, the order reverses
CHECK_EVERY_HEADER = """() => {
  const keys = (table, col) => Array.from(table.rows).slice(1).map(r => {
    const c = r.cells[col]; return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.textContent; });
  const ordered = (k, dir) => k.every((x, i) => i === 0 || (typeof x === 'number'
      ? (isNaN(x) || (!isNaN(k[i - 1]) && (dir === 'asc' ? k[i - 1] <= x : k[i - 1] >= x)))
      : (dir === 'asc' ? k[i - 1].localeCompare(x) <= 0 : k[i - 1].localeCompare(x) >= 0)));
  const bad = [];
  document.querySelectorAll('table.sortable').forEach((table, t) => {
    Array.from(table.rows[0].cells).forEach((th, col) => {
      for (let click = 0; click < 2; click++) {
        th.click();
        if (!ordered(keys(table, col), th.dataset.dir)) bad.push([t, th.textContent, th.dataset.dir]);
      }
    });
  });
  return {tables: document.querySelectorAll('table.sortable').length, bad: bad};
}"""


FIRST_TABLE_AFTER = """heading => {
  const h = Array.from(document.querySelectorAll('h2')).find(e => e.textContent.startsWith(heading));
  let t = h.nextElementSibling; while (t.tagName !== 'TABLE') t = t.querySelector('table') || t.nextElementSibling;
  return t; }"""


def column(page, heading: str, col: int) -> list:
    """The visible text of column `col` of the first table after the section `heading`."""
    return page.evaluate(f"([heading, col]) => Array.from(({FIRST_TABLE_AFTER})(heading).rows).slice(1)"
                         f".map(r => r.cells[col].textContent)", [heading, col])


def click(page, heading: str, header: str) -> None:
    """A real mouse click on the header cell `header` of the first table after the section `heading`."""
    page.evaluate_handle(f"([heading, header]) => Array.from(({FIRST_TABLE_AFTER})(heading).rows[0].cells)"
                         f".find(th => th.textContent === header)", [heading, header]).as_element().click()


def test_report_tables_sort_in_a_browser(parity_run, tmp_path, browser):
    """Every table of the report sorts on a header click (each on its own columns), the per-class table by numbers
    and back to taxonomic order, the per-rank table by accuracy, with no error in the page."""
    labelled, out, images, _ = parity_run
    evaluate_stage(EvaluateSplit(str(labelled), str(out.with_suffix(".parquet")), str(tmp_path / "r"), "train",
                                 str(images)), EvaluateConfig(fiftyone=False))
    page = browser.new_page()
    errors: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "r" / "report.html").as_uri())
    pc = pd.read_csv(tmp_path / "r" / "per_class.csv")
    assert column(page, "Per class", 0) == pc.name.tolist() == taxonomic_order()  # as written: taxonomic order
    click(page, "Per class", "ROIs")
    assert [int(v.replace(",", "")) for v in column(page, "Per class", 1)] == sorted(pc.support, reverse=True)
    click(page, "Per class", "ROIs")
    assert [int(v.replace(",", "")) for v in column(page, "Per class", 1)] == sorted(pc.support)
    click(page, "Per class", "mean distance")
    shown = column(page, "Per class", 5)
    known = sorted(pc.mean_distance.dropna(), reverse=True)
    assert shown == [f"{v:.3f}" for v in known] + ["-"] * int(pc.mean_distance.isna().sum())  # missing last
    click(page, "Per class", "class")
    assert column(page, "Per class", 0) == taxonomic_order()
    ranks = json.loads((tmp_path / "r" / "metrics.json").read_text())["accuracy_per_rank"]
    click(page, "Accuracy per rank", "accuracy")
    by_accuracy = sorted((v["accuracy"] for v in ranks.values() if v["accuracy"] is not None), reverse=True)
    assert column(page, "Accuracy per rank", 1) == [f"{v:.3f}" for v in by_accuracy]
    result = page.evaluate(CHECK_EVERY_HEADER)
    assert result["tables"] >= 6 and result["bad"] == [] and errors == []
    page.close()


def test_expected_distance_rule_beside_argmax_and_its_opt_in_csv(parity_run, tmp_path):
    """From the saved logits: per ROI the rule's answer and distance in rois.csv, its scores in metrics.json and
    per_class.csv, equal to recomputing them from the CSV; the competition CSV of the rule only when asked."""
    labelled, out, images, lost = parity_run
    split = EvaluateSplit(str(labelled), str(out.with_suffix(".parquet")), str(tmp_path / "r"), "train", str(images))
    evaluate_stage(split, EvaluateConfig(fiftyone=False, expected_distance_csv=True))
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    rule = m["expected_distance_rule"]
    rois = pd.read_csv(tmp_path / "r" / "rois.csv", keep_default_na=False)
    predicted = rois[rois.prediction != ""]
    assert rule["n"] == len(predicted) == 30 - len(lost)
    assert rule["n_differ"] == int((predicted.rule_prediction != predicted.prediction).sum())
    recomputed = [distance(t, p) for t, p in zip(predicted.truth, predicted.rule_prediction)]
    assert (predicted.rule_distance == recomputed).all()
    assert rule["mean_hierarchical_distance_rule"] == pytest.approx(predicted.rule_distance.mean())
    assert rule["mean_hierarchical_distance_argmax"] == pytest.approx(m["predicted_only"]["mean_hierarchical_distance"])
    assert rule["competition_score_rule"] == pytest.approx((predicted.rule_distance.sum() + 12 * len(lost)) / 30)
    assert rule["expected_distance_rule"] <= rule["expected_distance_argmax"]
    assert (predicted.rule_expected_distance.astype(float) <= predicted.expected_distance.astype(float) + 1e-6).all()
    better = (predicted.rule_distance < predicted.distance).sum()
    assert (rule["n_better"], rule["n_worse"]) == (better, (predicted.rule_distance > predicted.distance).sum())
    pc = pd.read_csv(tmp_path / "r" / "per_class.csv").set_index("name")
    by_class = rois.groupby("truth").rule_distance.mean()
    assert np.allclose(pc.loc[by_class.index, "mean_distance_rule"], by_class, atol=1e-4)
    csv = pd.read_csv(tmp_path / "r" / "predictions.expected_distance.csv")
    assert list(csv.columns) == ["annotation_id", "concept_name"]
    assert dict(zip(csv.annotation_id, csv.concept_name)) == dict(zip(predicted.annotation_id,
                                                                      predicted.rule_prediction))
    argmax_csv = pd.read_csv(out)  # the infer stage's competition CSV stays argmax
    assert dict(zip(argmax_csv.annotation_id, argmax_csv.concept_name)) == dict(zip(predicted.annotation_id,
                                                                                    predicted.prediction))
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Beyond argmax" in page and f"{rule['competition_score_rule']:.3f}" in page

    plain = tmp_path / "plain"  # without the option: no rule CSV; from the CSV alone (no logits): no rule at all
    evaluate_stage(EvaluateSplit(str(labelled), str(out), str(plain), "train"), EvaluateConfig(fiftyone=False))
    assert not (plain / "predictions.expected_distance.csv").exists()
    assert "expected_distance_rule" not in json.loads((plain / "metrics.json").read_text())
    with pytest.raises(ValueError, match="needs the logits"):
        evaluate_stage(EvaluateSplit(str(labelled), str(out), str(tmp_path / "x"), "train"),
                       EvaluateConfig(fiftyone=False, expected_distance_csv=True))


def test_logits_in_another_column_order_are_refused(parity_run, tmp_path):
    labelled, out, _, _ = parity_run
    preds = pd.read_parquet(out.with_suffix(".parquet"))
    preds["logits"] = [np.asarray(v)[::-1].copy() for v in preds["logits"]]  # columns reversed: argmax moves
    preds.to_parquet(tmp_path / "shuffled.parquet")
    with pytest.raises(ValueError, match="the logits' columns are not this file's categories in id order"):
        score(load_coco(labelled), read_predictions(tmp_path / "shuffled.parquet"))
