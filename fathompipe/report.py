"""Scores, tables, plots and an HTML page for one split's predictions.

With labels: the competition score (mean hierarchical distance), accuracy overall and per rank,
per-class precision/recall/F1/support, the confusion matrix in taxonomic order, the most confused
pairs and the distribution of distances. Without labels (the official test split) no score exists:
the report says so and shows what the model predicted instead.
"""
from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from . import atomic
from .annotations import CocoDataset
from .metric import MAX_DISTANCE, distances, same_rank
from .taxonomy import RANKS, load_taxonomy, taxonomic_order

N_DISAGREEMENTS = 50


def load_predictions(path: str | Path) -> pd.DataFrame:
    """annotation_id, concept_name and, from the parquet, confidence and top-5 (else NaN)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"predictions {path} do not exist (run the infer stage first)")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, dtype={"annotation_id": "int64", "concept_name": "string"}, keep_default_na=False)
        if list(df.columns[:2]) != ["annotation_id", "concept_name"]:
            raise ValueError(f"{path}: expected columns annotation_id,concept_name, got {list(df.columns)}")
    if df["annotation_id"].duplicated().any():
        dup = int(df["annotation_id"][df["annotation_id"].duplicated()].iloc[0])
        raise ValueError(f"{path}: annotation_id {dup} appears more than once")
    if "confidence" not in df:
        df["confidence"] = np.nan
    return df.set_index("annotation_id")


@dataclass
class Evaluation:
    metrics: Dict[str, object]
    table: pd.DataFrame  # one row per annotation: truth, prediction, confidence, distance, image_id, bbox


def evaluate(dataset: CocoDataset, predictions: pd.DataFrame) -> Evaluation:
    taxonomy = load_taxonomy()
    rows = []
    for a in dataset.annotations:
        pred = predictions["concept_name"].get(a.id)
        rows.append({"annotation_id": a.id, "image_id": a.image_id, "bbox": a.bbox,
                     "truth": dataset.categories[a.category_id] if a.category_id is not None else None,
                     "prediction": None if pred is None or pd.isna(pred) else str(pred),
                     "confidence": float(predictions["confidence"].get(a.id, np.nan))})
    table = pd.DataFrame(rows)
    predicted = table["prediction"].notna()
    known = table["prediction"].isin(list(taxonomy))
    metrics: Dict[str, object] = {
        "n_annotations": len(table),
        "n_predictions": int(predicted.sum()),
        "n_missing_predictions": int((~predicted).sum()),
        "n_unknown_names": int((predicted & ~known).sum()),
        "n_extra_predictions": int(len(set(predictions.index) - set(table["annotation_id"]))),
        "labelled": bool(table["truth"].notna().all()) and len(table) > 0,
    }
    counts = Counter(table.loc[predicted, "prediction"])
    metrics["prediction_counts"] = dict(counts.most_common())
    if not metrics["labelled"]:
        metrics["note"] = ("no score can be computed: this split has no labels (category_id is null); "
                           "the report shows the distribution of predictions instead")
        return Evaluation(metrics, table)

    table["distance"] = distances(table["truth"].tolist(), table["prediction"].tolist())
    table["correct"] = table["truth"] == table["prediction"]
    metrics["mean_hierarchical_distance"] = float(table["distance"].mean())
    metrics["accuracy"] = float(table["correct"].mean())
    metrics["distance_histogram"] = {str(d): int((table["distance"] == d).sum()) for d in range(MAX_DISTANCE + 1)}
    per_rank = {}
    for rank in RANKS[1:]:
        has = table["truth"].map(lambda t: bool(taxonomy[t].at(rank)))
        hits = [same_rank(t, p, rank) for t, p in zip(table.loc[has, "truth"], table.loc[has, "prediction"])]
        per_rank[rank] = {"accuracy": float(np.mean(hits)) if hits else None, "n": int(has.sum())}
    metrics["accuracy_per_rank"] = per_rank
    metrics["per_class"] = per_class(table).set_index("name").to_dict(orient="index")
    return Evaluation(metrics, table)


def per_class(table: pd.DataFrame) -> pd.DataFrame:
    from sklearn.metrics import precision_recall_fscore_support
    names = taxonomic_order()
    pred = table["prediction"].fillna("(none)")
    p, r, f, s = precision_recall_fscore_support(table["truth"], pred, labels=names, zero_division=0)
    mean_distance = table.groupby("truth")["distance"].mean()
    return pd.DataFrame({"name": names, "precision": p, "recall": r, "f1": f, "support": s,
                         "mean_distance": [float(mean_distance.get(n, np.nan)) for n in names]})


def confusions(table: pd.DataFrame) -> pd.DataFrame:
    wrong = table[~table["correct"]]
    pairs = wrong.groupby(["truth", "prediction"], dropna=False).agg(
        count=("annotation_id", "size"), distance=("distance", "first")).reset_index()
    return pairs.sort_values(["count", "distance"], ascending=[False, False]).reset_index(drop=True)


def _plots(ev: Evaluation, out: Path) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: List[str] = []
    m = ev.metrics
    if m["labelled"]:
        names = taxonomic_order()
        index = {n: i for i, n in enumerate(names)}
        cm = np.zeros((len(names), len(names)), np.int64)
        for t, p in zip(ev.table["truth"], ev.table["prediction"]):
            if p in index:
                cm[index[t], index[p]] += 1
        fig, ax = plt.subplots(figsize=(14, 12))
        shown = np.where(cm > 0, cm, np.nan)
        im = ax.imshow(shown, cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
        ax.set_yticks(range(len(names)), names, fontsize=5)
        ax.set_xlabel("predicted (taxonomic order)")
        ax.set_ylabel("true (taxonomic order)")
        ax.set_title("Confusion matrix: relatives sit next to each other")
        fig.colorbar(im, ax=ax, shrink=0.6, label="annotations")
        fig.tight_layout()
        fig.savefig(out / "confusion_matrix.png", dpi=110)
        plt.close(fig)
        files.append("confusion_matrix.png")

        ranks = [r for r in RANKS[1:] if m["accuracy_per_rank"][r]["accuracy"] is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        values = [m["accuracy_per_rank"][r]["accuracy"] for r in ranks]
        ax.bar(ranks, values, color="#2a7fb8")
        for i, v in enumerate(values):
            ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=9)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("accuracy")
        ax.set_title("Is the predicted taxon right at each rank?")
        fig.tight_layout()
        fig.savefig(out / "accuracy_per_rank.png", dpi=110)
        plt.close(fig)
        files.append("accuracy_per_rank.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        hist = m["distance_histogram"]
        ax.bar([int(k) for k in hist], list(hist.values()), color="#e07b39")
        ax.set_xticks(range(MAX_DISTANCE + 1))
        ax.set_xlabel("hierarchical distance (0 = exact, 12 = unrelated or missing)")
        ax.set_ylabel("annotations")
        ax.set_title(f"Distance distribution (mean {m['mean_hierarchical_distance']:.3f})")
        fig.tight_layout()
        fig.savefig(out / "distance_histogram.png", dpi=110)
        plt.close(fig)
        files.append("distance_histogram.png")
    else:
        counts = m["prediction_counts"]
        top = list(counts.items())[:40]
        fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(top))))
        ax.barh([n for n, _ in top][::-1], [c for _, c in top][::-1], color="#2a7fb8")
        ax.set_xlabel("annotations")
        ax.set_title("Predicted categories (no labels on this split)")
        fig.tight_layout()
        fig.savefig(out / "prediction_distribution.png", dpi=110)
        plt.close(fig)
        files.append("prediction_distribution.png")
    return files


def _crops(ev: Evaluation, dataset: CocoDataset, images_dir: Optional[Path], naming: str, rows: pd.DataFrame,
           out: Path) -> Dict[int, str]:
    """A thumbnail of each listed ROI (with some context) where its image is on disk."""
    from PIL import Image
    found: Dict[int, str] = {}
    if images_dir is None:
        return found
    (out / "crops").mkdir(exist_ok=True)
    for row in rows.itertuples():
        path = images_dir / dataset.images[row.image_id].local_name(naming)
        if not path.exists():
            continue
        x, y, w, h = row.bbox
        pad = max(w, h) * 0.5
        try:
            with Image.open(path) as im:
                crop = im.convert("RGB").crop((int(x - pad), int(y - pad), int(x + w + pad), int(y + h + pad)))
                crop.thumbnail((160, 160))
                name = f"crops/{row.annotation_id}.jpg"
                crop.save(out / name, quality=85)
                found[row.annotation_id] = name
        except OSError:
            continue
    return found


def write_report(ev: Evaluation, dataset: CocoDataset, out: Path, title: str, images_dir: Optional[Path] = None,
                 naming: str = "file_name", extra: Optional[Dict[str, str]] = None) -> Path:
    """metrics.json, per_class.csv, confusions.csv, PNG plots and report.html in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    m = ev.metrics
    plots = _plots(ev, out)
    sections: List[str] = []
    if m["labelled"]:
        pc = per_class(ev.table)
        atomic.write_text(out / "per_class.csv", pc.to_csv(index=False, float_format="%.4f"))
        conf = confusions(ev.table)
        atomic.write_text(out / "confusions.csv", conf.to_csv(index=False))
        wrong = ev.table[~ev.table["correct"]].copy()
        wrong = wrong.sort_values(["confidence", "distance"], ascending=[False, False], na_position="last")
        top = wrong.head(N_DISAGREEMENTS)
        crops = _crops(ev, dataset, images_dir, naming, top, out)
        rows = "".join(
            f"<tr><td>{r.annotation_id}</td><td>{_img(crops.get(r.annotation_id))}</td><td>{html.escape(str(r.truth))}</td>"
            f"<td>{html.escape(str(r.prediction))}</td><td>{_fmt(r.confidence)}</td><td>{r.distance}</td></tr>"
            for r in top.itertuples())
        ranks = "".join(f"<tr><td>{k}</td><td>{_fmt(v['accuracy'])}</td><td>{v['n']}</td></tr>"
                        for k, v in m["accuracy_per_rank"].items())
        pairs = "".join(f"<tr><td>{html.escape(str(r.truth))}</td><td>{html.escape(str(r.prediction))}</td>"
                        f"<td>{r.count}</td><td>{r.distance}</td></tr>" for r in conf.head(20).itertuples())
        headline = (f"<div class=big>{m['mean_hierarchical_distance']:.3f}</div><div>mean hierarchical distance "
                    f"(competition score; 0 best, 12 worst)</div><p>accuracy {m['accuracy']:.3f} over "
                    f"{m['n_annotations']} annotations; {m['n_missing_predictions']} missing predictions and "
                    f"{m['n_unknown_names']} unknown names scored 12.</p>")
        sections += [f"<h2>Accuracy per rank</h2><table><tr><th>rank</th><th>accuracy</th><th>n</th></tr>{ranks}"
                     "</table>",
                     f"<h2>Most confused pairs</h2><p>All pairs: <a href=confusions.csv>confusions.csv</a>; "
                     f"per class: <a href=per_class.csv>per_class.csv</a>.</p><table><tr><th>true</th>"
                     f"<th>predicted</th><th>count</th><th>distance</th></tr>{pairs}</table>",
                     f"<h2>The {len(top)} most confident disagreements (label-error candidates)</h2><table>"
                     f"<tr><th>annotation</th><th>crop</th><th>label</th><th>prediction</th><th>confidence</th>"
                     f"<th>distance</th></tr>{rows}</table>"]
    else:
        headline = f"<p class=warn>{html.escape(str(m['note']))}.</p><p>{m['n_predictions']} predictions for " \
                   f"{m['n_annotations']} annotations.</p>"
    atomic.write_json(out / "metrics.json", m)
    extras = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in (extra or {}).items())
    images = "".join(f"<img src={p} alt={p}>" for p in plots)
    page = f"""<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}} .big{{font-size:3em;font-weight:bold}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
img{{max-width:100%}} .warn{{background:#fff3cd;padding:1em}}</style></head><body>
<h1>{html.escape(title)}</h1>{headline}<ul>{extras}</ul>{images}{''.join(sections)}
<p>Numbers: <a href=metrics.json>metrics.json</a></p></body></html>"""
    atomic.write_text(out / "report.html", page)
    return out / "report.html"


def _fmt(value: object) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _img(src: Optional[str]) -> str:
    return f"<img src={src} width=120>" if src else "(image not on disk)"


def headline(metrics: Dict[str, object]) -> str:
    if metrics.get("labelled"):
        return (f"mean hierarchical distance {metrics['mean_hierarchical_distance']:.3f}, accuracy "
                f"{metrics['accuracy']:.3f} over {metrics['n_annotations']} annotations")
    return f"{metrics['n_predictions']} predictions; {metrics['note']}"

