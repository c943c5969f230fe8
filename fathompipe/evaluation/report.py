"""The report of one split's scores: report.html (self-contained, readable offline) and CSVs.

The page leads with the model's score over the ROIs it predicted, its coverage and the competition
score; then a 79x79 confusion matrix drawn as inline SVG (hover names the pair, its count and
distance; no network needed), the disagreements most likely to be label errors (highest
mistakenness) with a crop and the image's file name, per-rank and per-class tables, and what the
expected-distance rule (decision.py) would score beside argmax. Every table sorts on a click on its
header. Scores come from `scoring`; this module only renders them.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from fathompipe import atomic
from fathompipe.annotations import Coco
from fathompipe.evaluation.metric import distance
from fathompipe.evaluation.scoring import Evaluation
from fathompipe.evaluation.taxonomy import RANKS, load_taxonomy, taxonomic_order


N_CANDIDATES = 50  # label-error candidates listed (each gets a crop)
N_NOT_PREDICTED = 20
CROP_PX = 128  # side of a crop in the page
CROP_CONTEXT_PX = 96  # smallest window cut around a ROI
CSV_ROWS = 100_000  # rois.csv is written this many rows at a time
CELL = 12  # px per confusion-matrix cell: 79 classes make a 948 px square, labels at 11 px
LABEL_W = 185
# count bins (lower bounds) for the colour scale: integers, roughly logarithmic
BINS = (1, 2, 4, 10, 30, 100, 300, 1000)
OFF_DIAGONAL = ("#fdd0a2", "#fdae6b", "#fd8d3c", "#f16913", "#d94801", "#a63603", "#7f2704", "#4a1a02")
DIAGONAL = ("#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b", "#041a3a")


def write_report(ev: Evaluation, dataset: Coco, out: Path, title: str, images_dir: Optional[Path] = None,
                 naming: str = "file_name", extra: Optional[Dict[str, str]] = None) -> Path:
    """metrics.json, rois.csv, per_class.csv, confusions.csv, confusion_matrix.csv, crops/ and report.html."""
    out.mkdir(parents=True, exist_ok=True)
    m = ev.metrics
    table = ev.table
    image_rows = dataset.images.rows_of(table["image_id"].to_numpy())
    files = np.asarray(dataset.images.local_names(naming) + [""], dtype=object)
    with atomic.atomic_path(out / "rois.csv") as tmp, open(tmp, "w") as fh:  # 2M ROIs: in slices, never copied whole
        for start in range(0, max(len(table), 1), CSV_ROWS):
            rows = slice(start, start + CSV_ROWS)
            table.iloc[rows].assign(file_name=files[image_rows[rows]]).to_csv(
                fh, index=False, header=start == 0, float_format="%.6g")
    sections: List[str] = [_headline_html(m)]
    not_predicted = table[table["prediction"].isna()]
    if m["labelled"]:
        assert ev.per_class is not None and ev.confusions is not None and ev.matrix is not None
        pc, conf = ev.per_class, ev.confusions
        atomic.write_text(out / "per_class.csv", pc.to_csv(index=False, float_format="%.4f"))
        atomic.write_text(out / "confusions.csv", conf.to_csv(index=False))
        names, cm = ev.matrix
        atomic.write_text(out / "confusion_matrix.csv", pd.DataFrame(cm, index=names, columns=names).to_csv())
        sections.append(_matrix_html(names, cm))
        sections.append(_candidates_html(table, dataset, images_dir, naming, out, m.get("mistakenness_from")))
        sections.append(_ranks_html(m))
        pairs = "".join(f"<tr>{_name(r.truth)}{_name(r.prediction)}<td data-v={r.count}>{r.count:,}</td>"
                        f"<td data-v={r.distance}>{r.distance}</td></tr>" for r in conf.head(20).itertuples())
        sections.append(f"<h2>Most confused pairs</h2><p>All pairs: <a href=confusions.csv>confusions.csv</a>; the "
                        f"matrix: <a href=confusion_matrix.csv>confusion_matrix.csv</a>.</p><table class=sortable><tr>"
                        f"<th class=up>true</th><th class=up>predicted</th><th>count</th><th>distance</th></tr>"
                        f"{pairs}</table>")
        sections.append(_per_class_html(pc))
    else:
        counts = m["prediction_counts"]
        assert isinstance(counts, dict)
        sections.append("<h2>What the model predicted</h2>"
                        + _bars([(n, c, f"{c:,}") for n, c in counts.items()], "#2a7fb8", ("category", "ROIs")))
    if "expected_distance_rule" in m:
        sections.append(_rule_html(m))
    if len(not_predicted):
        rows = "".join(f"<tr><td data-v={r.annotation_id}>{r.annotation_id}</td>"
                       f"<td>{_e(dataset.image(r.image_id).local_name(naming))}</td><td>{_e(r.not_predicted)}</td></tr>"
                       for r in not_predicted.head(N_NOT_PREDICTED).itertuples())
        sections.append(f"<h2>ROIs without a prediction ({len(not_predicted):,})</h2><p>All of them, with every "
                        f"score: <a href=rois.csv>rois.csv</a> (empty <code>prediction</code>).</p>"
                        f"<table class=sortable><tr><th>annotation</th><th>image file</th><th>why</th></tr>"
                        f"{rows}</table>")
    atomic.write_json(out / "metrics.json", m)
    extras = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in (extra or {}).items())
    body, contents = _anchored("".join(sections))
    page = f"""<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title><style>{CSS}</style></head>
<body><h1>{_e(title)}</h1><ul class=extras>{extras}</ul><p class=toc>{contents}</p>{body}
<p>Numbers: <a href=metrics.json>metrics.json</a>; every ROI: <a href=rois.csv>rois.csv</a>.</p>
<div id=tip></div><script>{SCRIPT}</script></body></html>"""
    atomic.write_text(out / "report.html", page)
    return out / "report.html"


def _anchored(body: str) -> Tuple[str, str]:
    """The body with an id on each section heading, and links to them (the page is long)."""
    titles: List[str] = []

    def anchor(match: "re.Match[str]") -> str:
        titles.append(re.sub(r"<[^>]+>|:.*", "", match.group(1)))
        return f"<h2 id=s{len(titles)}>{match.group(1)}</h2>"

    body = re.sub(r"<h2>(.*?)</h2>", anchor, body)
    return body, " · ".join(f"<a href=#s{i}>{_e(t)}</a>" for i, t in enumerate(titles, 1))


def _headline_html(m: Dict[str, object]) -> str:
    n, k = m["n_annotations"], m["n_predictions"]
    why = m["not_predicted"]
    assert isinstance(why, dict)
    reasons = "; ".join(f"{c} {_e(r)}" for r, c in why.items())
    cards = [(f"{100 * float(m['coverage']):.1f}%", f"coverage: {k:,} of {n:,} ROIs predicted"
              + (f"<br>not predicted: {reasons}" if reasons else ""))]
    if m["labelled"]:
        own = m["predicted_only"]
        assert isinstance(own, dict)
        if own["n"]:
            cards.insert(0, (f"{own['mean_hierarchical_distance']:.3f}",
                             f"mean hierarchical distance over the {own['n']:,} ROIs predicted (0 best, 12 worst)"))
            cards.insert(1, (f"{own['accuracy']:.3f}", "accuracy over the ROIs predicted"))
        cards.append((f"{m['mean_hierarchical_distance']:.3f}",
                      f"competition score over all {n:,} ROIs: a missing prediction scores 12 "
                      f"({m['n_missing_predictions']:,} missing, {m['n_unknown_names']:,} unknown names)"))
    body = "".join(f"<div class=card><div class=big>{v}</div><div>{t}</div></div>" for v, t in cards)
    note = "" if m["labelled"] else f"<p class=warn>{_e(m['note'])}.</p>"
    return f"{note}<div class=cards>{body}</div>"


def _color(count: int, palette: Sequence[str]) -> str:
    return palette[min(int(np.searchsorted(BINS, count, side="right")) - 1, len(palette) - 1)]


def _legend(palette: Sequence[str], label: str) -> str:
    edges = list(BINS[:len(palette)])
    spans = [f"{a}" if b - a == 1 else f"{a}–{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    cells = "".join(f"<span class=sw style='background:{c}'></span><span class=lg>{s}</span>"
                    for c, s in zip(palette, spans))
    return f"<div class=legend><b>{label}</b> {cells}</div>"


def _matrix_html(names: List[str], cm: np.ndarray) -> str:
    """Inline SVG: one 12 px cell per (true, predicted) pair, diagonal in blue, confusions in red,
    phylum boundaries as lines; the script shows the pair under the pointer (a <title> without it)."""
    taxonomy = load_taxonomy()
    k = len(names)
    side = k * CELL
    phylum = [taxonomy[n].at(RANKS[1]) for n in names]
    parts = [f"<svg id=cm xmlns='http://www.w3.org/2000/svg' width={LABEL_W + side + 2} height={LABEL_W + side + 2} "
             f"font-size=11 font-family=sans-serif>",
             f"<g transform='translate({LABEL_W},{LABEL_W})'>",
             f"<rect width={side} height={side} fill='#fff' stroke='#999' />"]
    parts += [f"<rect x={i * CELL} y={i * CELL} width={CELL} height={CELL} fill=none stroke='#9ecae1' />"
              for i in range(k)]  # the diagonal stays visible where a class has no correct prediction
    for i, j in zip(*np.nonzero(cm)):
        c = int(cm[i, j])
        parts.append(f"<rect x={j * CELL} y={i * CELL} width={CELL} height={CELL} "
                     f"fill='{_color(c, DIAGONAL if i == j else OFF_DIAGONAL)}'><title>true {_e(names[i])}, predicted "
                     f"{_e(names[j])}: {c}</title></rect>")
    for i in range(1, k):
        if phylum[i] != phylum[i - 1]:
            parts.append(f"<line x1=0 y1={i * CELL} x2={side} y2={i * CELL} stroke='#555' stroke-width='0.8' />"
                         f"<line x1={i * CELL} y1=0 x2={i * CELL} y2={side} stroke='#555' stroke-width='0.8' />")
    band = "fill='#000' fill-opacity='0.1' pointer-events='none'"  # the row and column under the pointer
    parts.append(f"<rect id=cmrow x=0 width=0 height={CELL} {band} /><rect id=cmcol y=0 width={CELL} height=0 {band} />"
                 "</g>")
    for i, n in enumerate(names):
        at = LABEL_W + i * CELL + CELL - 2.5  # text baseline inside row / column i
        parts.append(f"<text class=rl x={LABEL_W - 4} y={at} text-anchor=end>{_e(n)}</text>")
        parts.append(f"<text class=cl transform='translate({at},{LABEL_W - 4}) rotate(-90)'>{_e(n)}</text>")
    parts.append("</svg>")
    dist = [[distance(t, p) for p in names] for t in names]
    data = json.dumps({"names": names, "phylum": phylum, "cm": cm.tolist(), "dist": dist, "cell": CELL,
                       "off": LABEL_W}, separators=(",", ":"))
    correct = int(np.trace(cm))
    return (f"<h2>Confusion matrix</h2><p>Rows: the true class; columns: the predicted class; classes in taxonomic "
            f"order, so relatives sit together (lines between phyla). Blue: correct ({correct:,} ROIs on the "
            f"diagonal); red: confusions ({int(cm.sum()) - correct:,}). Point at a cell for the pair, its count and "
            f"distance.</p>{_legend(DIAGONAL, 'correct')}{_legend(OFF_DIAGONAL, 'confused')}"
            f"<div class=scroll>{''.join(parts)}</div><script>const CM={data};</script>")


def _candidates_html(table: pd.DataFrame, dataset: Coco, images_dir: Optional[Path], naming: str, out: Path,
                     source: object) -> str:
    wrong = table[table["prediction"].notna() & ~table["correct"]]
    key = ["mistakenness", "confidence", "distance"] if source else ["confidence", "distance"]
    top = wrong.sort_values(key, ascending=False, na_position="last").head(N_CANDIDATES)
    crops = _crops(dataset, images_dir, naming, top, out)
    rows = []
    for r in top.itertuples():
        name = dataset.image(r.image_id).local_name(naming)
        path = images_dir / name if images_dir else None
        link = f"<a href='{_e(path.resolve().as_uri())}'>{_e(name)}</a>" if path and path.exists() else _e(name)
        crop = crops.get(r.annotation_id)
        img = f"<img src={crop} alt='ROI {r.annotation_id}'>" if crop else "<span class=dim>(image not on disk)</span>"
        rows.append(f"<tr><td>{img}</td><td>{link}<br><span class=dim>image {r.image_id}, ROI {r.annotation_id}"
                    f"</span></td><td>{_e(r.truth)}</td><td>{_e(r.prediction)}</td>{_num(r.confidence)}"
                    f"{_num(r.mistakenness)}<td data-v={r.distance}>{r.distance}</td></tr>")
    how = ("mistakenness (FiftyOne Brain's definition, from the model's " + str(source) + "): near 1 when the model "
           "confidently disagrees with the label" if source else "confidence (no logits or confidences to compute "
           "mistakenness from)")
    return (f"<h2>Label-error candidates: the {len(top)} disagreements most likely wrong in the ground truth</h2>"
            f"<p>{len(wrong):,} predicted ROIs disagree with their label; ranked by {how}. Click a column to sort; "
            f"every ROI with its scores: <a href=rois.csv>rois.csv</a>.</p><table class=sortable><tr><th>crop (box "
            f"outlined)</th><th>image file</th><th>label</th><th>prediction</th><th>confidence</th>"
            f"<th>mistakenness</th><th>distance</th></tr>{''.join(rows)}</table>")


def _crops(dataset: Coco, images_dir: Optional[Path], naming: str, rows: pd.DataFrame,
           out: Path) -> Dict[int, str]:
    """A thumbnail of each listed ROI with some context and its box outlined, where its image is on disk."""
    from PIL import Image, ImageDraw
    found: Dict[int, str] = {}
    if images_dir is None:
        return found
    (out / "crops").mkdir(exist_ok=True)
    for row in rows.itertuples():
        path = images_dir / dataset.image(row.image_id).local_name(naming)
        if not path.exists():
            continue
        x, y, w, h = dataset.annotations.bbox[row.Index]  # the table's rows are the annotation file's
        side = max(2 * max(w, h), CROP_CONTEXT_PX)  # a square: the box with its own size of context around it
        left, top = int(x + w / 2 - side / 2), int(y + h / 2 - side / 2)
        try:
            with Image.open(path) as im:  # black where the square leaves the image
                crop = im.crop((left, top, left + int(side), top + int(side))).convert("RGB")
        except OSError:
            continue
        scale = CROP_PX / int(side)  # small ROIs are enlarged, so every crop shows at the same size
        crop = crop.resize((CROP_PX, CROP_PX), Image.BICUBIC)
        box = [(x - left) * scale, (y - top) * scale, (x + w - left) * scale, (y + h - top) * scale]
        ImageDraw.Draw(crop).rectangle(box, outline=(255, 220, 0), width=2)
        name = f"crops/{row.annotation_id}.jpg"
        with atomic.atomic_path(out / name) as tmp:
            crop.save(tmp, format="JPEG", quality=85)
        found[row.annotation_id] = name
    return found


def _bars(rows: Sequence[Tuple[str, float, str]], color: str, heads: Tuple[str, str]) -> str:
    """A table of labelled horizontal bars (no plotting library, no image files)."""
    top = max([v for _, v, _ in rows] + [1e-12])
    body = "".join(f"<tr><td data-v={k}>{_e(label)}</td><td data-v={value}>{text}</td><td class=bar data-v={value}>"
                   f"<div style='width:{100 * value / top:.1f}%;background:{color}'></div></td></tr>"
                   for k, (label, value, text) in enumerate(rows))
    return (f"<table class='bars sortable'><tr><th class=up>{heads[0]}</th><th>{heads[1]}</th><th></th></tr>"
            f"{body}</table>")


def _ranks_html(m: Dict[str, object]) -> str:
    per_rank = m["accuracy_per_rank"]
    hist = m["distance_histogram"]
    assert isinstance(per_rank, dict) and isinstance(hist, dict)
    ranks = _bars([(f"{k} (n={v['n']:,})", v["accuracy"], _fmt(v["accuracy"])) for k, v in per_rank.items()
                   if v["accuracy"] is not None], "#2a7fb8", ("rank", "accuracy"))
    dist = _bars([(k, c, f"{c:,}") for k, c in hist.items()], "#e07b39", ("distance", "ROIs"))
    return (f"<h2>Accuracy per rank and distances</h2><div class=row><div><p>Is the predicted taxon right at each "
            f"rank? (all ROIs)</p>{ranks}</div><div><p>Hierarchical distance per ROI (0 exact, 12 unrelated or "
            f"missing)</p>{dist}</div></div>")


def _per_class_html(pc: pd.DataFrame) -> str:
    rule = "mean_distance_rule" in pc
    rows = "".join(f"<tr>{_name(r.name)}<td data-v={r.support}>{r.support:,}</td>{_num(r.precision)}"
                   f"{_num(r.recall)}{_num(r.f1)}{_num(r.mean_distance)}"
                   + (f"{_num(r.mean_distance_rule)}{_num(r.mean_distance_rule - r.mean_distance, signed=True)}"
                      if rule else "") + "</tr>" for r in pc.itertuples())
    heads = "<th class=up>class</th>" + "".join(f"<th>{h}</th>" for h in (
        "ROIs", "precision", "recall", "F1", "mean distance") + (("mean distance, rule", "rule &minus; argmax") if rule
                                                                 else ()))
    return ("<h2>Per class</h2><p>Taxonomic order (click <i>class</i> for it again); click a column to sort, again to "
            "reverse." + (" <i>Mean distance, rule</i>: the expected-distance rule's answers on the same ROIs "
                           "(below); a negative difference is where it helps." if rule else "")
            + f" Also <a href=per_class.csv>per_class.csv</a>.</p><table class=sortable><tr>{heads}</tr>{rows}</table>")


def _rule_html(m: Dict[str, object]) -> str:
    """Argmax beside the decision minimizing the expected hierarchical distance under the model's softmax."""
    r = m["expected_distance_rule"]
    assert isinstance(r, dict)
    what = (f"<p>For each ROI the model's softmax p gives every answer y an expected distance E(y) = &Sigma;<sub>c"
            f"</sub> p(c) d(c, y). Argmax answers the most probable class; the <b>expected-distance rule</b> answers "
            f"the y with the smallest E(y) among the 79 names, often a broader taxon when the model hesitates between "
            f"relatives. Under the model's own probabilities it is never worse; on the labels it helps as far as the "
            f"softmax is calibrated. Both come from the same saved logits. The competition CSV of the infer stage "
            f"stays argmax; <code>evaluate.expected_distance_csv: true</code> also writes the rule's "
            f"<code>{_e(RULE_CSV)}</code> here. Per ROI: <code>rule_prediction</code>, <code>rule_distance</code>, "
            f"<code>expected_distance</code> and <code>rule_expected_distance</code> in <a href=rois.csv>rois.csv</a>; "
            f"in the App, the saved view <code>&lt;eval_key&gt;-rule-differs</code>.</p>")
    cards = [(f"{r['n_differ']:,}", f"of the {r['n']:,} predicted ROIs get another answer from the rule")]
    cards.append((f"{r['expected_distance_argmax']:.3f} &rarr; {r['expected_distance_rule']:.3f}",
                  "mean expected distance under the model's own softmax, argmax &rarr; rule"))
    if "mean_hierarchical_distance_rule" in r:
        before, after = r["mean_hierarchical_distance_argmax"], r["mean_hierarchical_distance_rule"]
        cards.insert(0, (f"{before:.3f} &rarr; {after:.3f}",
                         f"mean hierarchical distance over the {r['n']:,} ROIs predicted, argmax &rarr; rule"))
        cards.insert(1, (f"{m['mean_hierarchical_distance']:.3f} &rarr; {r['competition_score_rule']:.3f}",
                         "competition score over all ROIs (a missing prediction scores 12), argmax &rarr; rule"))
        cards.append((f"{r['n_better']:,} / {r['n_worse']:,}", "ROIs where the rule's answer is closer / farther "
                       f"(accuracy {r['accuracy_argmax']:.3f} &rarr; {r['accuracy_rule']:.3f})"))
    body = "".join(f"<div class=card><div class=big>{v}</div><div>{t}</div></div>" for v, t in cards)
    changes = r.get("changes") or []
    table = ""
    if changes:
        rows = "".join(f"<tr>{_name(c['argmax'])}{_name(c['rule'])}<td data-v={c['n']}>{c['n']:,}</td>"
                       f"{_num(c['mean_distance_argmax'])}{_num(c['mean_distance_rule'])}</tr>" for c in changes)
        table = (f"<p>The most frequent substitutions (the rule's answer in place of argmax's):</p>"
                 f"<table class=sortable><tr><th class=up>argmax</th><th class=up>rule</th><th>ROIs</th>"
                 f"<th>mean distance, argmax</th>"
                 f"<th>mean distance, rule</th></tr>{rows}</table>")
    return f"<h2>Beyond argmax: the expected-distance rule</h2>{what}<div class=cards>{body}</div>{table}"


RULE_CSV = "predictions.expected_distance.csv"


def write_rule_csv(ev: Evaluation, out: Path) -> Path:
    """The competition CSV (annotation_id,concept_name) with the expected-distance rule's answers, for the ROIs
    with a prediction (as the infer stage's CSV); needs the logits (predictions.parquet)."""
    if "rule_prediction" not in ev.table:
        raise ValueError("evaluate.expected_distance_csv needs the logits: give the infer stage's predictions.parquet")
    rows = ev.table[ev.table["rule_prediction"].notna()].sort_values("annotation_id")
    path = out / RULE_CSV
    with atomic.atomic_path(path) as tmp:
        rows[["annotation_id", "rule_prediction"]].rename(columns={"rule_prediction": "concept_name"}).to_csv(
            tmp, index=False, chunksize=100_000)
    return path


def _e(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: object) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _num(value: object, signed: bool = False) -> str:
    """A table cell whose sort key is the number itself (missing sorts last)."""
    text = _fmt(value)
    if signed and text != "-":
        text = f"{value:+.3f}"
    return f"<td data-v={'NaN' if text == '-' else f'{value:.6f}'}>{text}</td>"


_POSITION = {n: i for i, n in enumerate(taxonomic_order())}


def _name(name: object) -> str:
    """A class-name cell that sorts in taxonomic order (unknown names after the 79)."""
    return f"<td data-v={_POSITION.get(str(name), len(_POSITION))}>{_e(name)}</td>"


CSS = """body{font-family:sans-serif;max-width:1400px;margin:1.5em auto;color:#222;padding:0 1em}
h2{margin-top:1.6em;border-bottom:1px solid #ddd} .cards{display:flex;flex-wrap:wrap;gap:12px;margin:1em 0}
.card{border:1px solid #ccc;border-radius:6px;padding:10px 14px;width:300px} .big{font-size:2.2em;font-weight:bold}
table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3} table.sortable th{cursor:pointer} table.sortable th:hover{background:#e4e4e4}
.warn{background:#fff3cd;padding:1em} .toc{font-size:14px} .dim{color:#777;font-size:0.85em} .extras{color:#555}
.row{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap} table.bars td.bar{width:260px;border:none}
table.bars td.bar div{height:14px}
.scroll{overflow:auto} .legend{margin:4px 0;font-size:13px} .sw{display:inline-block;width:16px;height:12px;
margin:0 2px 0 8px;vertical-align:middle;border:1px solid #bbb} .lg{vertical-align:middle}
#cm text.hl{font-weight:bold;fill:#c00} #tip{position:fixed;display:none;background:#fff;border:1px solid #888;
padding:6px 9px;font-size:13px;pointer-events:none;box-shadow:2px 2px 6px rgba(0,0,0,.25);max-width:420px}"""

SCRIPT = """
// Each sortable table sorts on its own header's column (th.cellIndex): by data-v where cells have one (numbers;
// class names by taxonomic position), else by text. First click: ascending for text and for headers of class 'up'
// (names, ranks), largest first for numbers; a second click reverses. Missing values (NaN) always sort last.
document.querySelectorAll('table.sortable').forEach(table => {
  Array.from(table.rows[0].cells).forEach(th => th.addEventListener('click', () => {
    const col = th.cellIndex, rows = Array.from(table.rows).slice(1);
    const key = r => { const c = r.cells[col];
      return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.textContent; };
    const up = th.classList.contains('up') || (rows.length > 0 && rows[0].cells[col].dataset.v === undefined);
    const dir = th.dataset.dir = th.dataset.dir ? (th.dataset.dir === 'desc' ? 'asc' : 'desc') : (up ? 'asc' : 'desc');
    Array.from(table.rows[0].cells).forEach(h => { if (h !== th) delete h.dataset.dir; });
    rows.sort((a, b) => { const x = key(a), y = key(b);
      if (typeof x === 'number' && (isNaN(x) || isNaN(y))) return isNaN(x) - isNaN(y);
      const o = typeof x === 'number' ? x - y : x.localeCompare(y); return dir === 'asc' ? o : -o; });
    rows.forEach(r => table.tBodies[0].appendChild(r));
  }));
});
const svg = document.getElementById('cm'), tip = document.getElementById('tip');
if (svg && typeof CM !== 'undefined') {
  const rl = svg.querySelectorAll('text.rl'), cl = svg.querySelectorAll('text.cl'), n = CM.names.length;
  const row = document.getElementById('cmrow'), colb = document.getElementById('cmcol');
  let last = [-1, -1];
  const clear = () => { if (last[0] >= 0) { rl[last[0]].classList.remove('hl'); cl[last[1]].classList.remove('hl'); }
    row.setAttribute('width', 0); colb.setAttribute('height', 0); tip.style.display = 'none'; last = [-1, -1]; };
  svg.addEventListener('mousemove', e => {
    const p = svg.getBoundingClientRect();
    const j = Math.floor((e.clientX - p.left - CM.off) / CM.cell);
    const i = Math.floor((e.clientY - p.top - CM.off) / CM.cell);
    if (i < 0 || j < 0 || i >= n || j >= n) { clear(); return; }
    if (i !== last[0] || j !== last[1]) { clear(); last = [i, j]; rl[i].classList.add('hl'); cl[j].classList.add('hl');
      row.setAttribute('y', i * CM.cell); row.setAttribute('width', n * CM.cell);
      colb.setAttribute('x', j * CM.cell); colb.setAttribute('height', n * CM.cell); }
    const c = CM.cm[i][j], total = CM.cm[i].reduce((a, b) => a + b, 0);
    tip.innerHTML = '<b>true</b> ' + CM.names[i] + ' <span class=dim>(' + CM.phylum[i] + ')</span><br>' +
      '<b>predicted</b> ' + CM.names[j] + ' <span class=dim>(' + CM.phylum[j] + ')</span><br>' +
      c + ' ROI' + (c === 1 ? '' : 's') +
      (total ? ' (' + (100 * c / total).toFixed(1) + '% of ' + total + ' ' + CM.names[i] + ')' : '') +
      '<br>hierarchical distance ' + CM.dist[i][j];
    tip.style.display = 'block';
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + 'px';
    tip.style.top = (e.clientY + 14) + 'px';
  });
  svg.addEventListener('mouseleave', clear);
}
"""
