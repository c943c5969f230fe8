"""What a reviewer opens in the App: saved views with truth beside prediction, and the winner's embeddings.

The saved views are ground-truth patches (one per ROI, the true label on the box) that also carry the
ROI's prediction: the prediction box itself (the `<field>` detection on the same annotation) and, on
the ground-truth detection, `predicted_label`, `predicted_confidence` and `mistakenness` (written by
fiftyone_eval). Tags set on these patches in the App (`label_error`, `reviewed`) are saved on the
dataset's ground-truth labels, which no rerun rewrites. The embeddings are the infer stage's per-ROI
feature vectors (what the classifier head sees), shown in the App's Embeddings panel as a 2-D Brain
visualization of the ground-truth patches, recomputed on every run under the same brain key.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from fathompipe.evaluation.fiftyone_io import RoiValues

if TYPE_CHECKING:
    import numpy as np

UMAP_MIN_POINTS = 30  # below this UMAP's 15 neighbours describe little: PCA instead
UMAP_NEIGHBOURS = 15  # umap-learn's (and FiftyOne Brain's) default
UMAP_SAMPLE = 150_000  # above this many ROIs the map is fitted on a sample (bench/scale.py --sections map)
PCA_SAMPLE = 50_000  # ROIs the PCA before UMAP is fitted on (its 50 components settle long before)
# layout epochs above 10,000 ROIs (umap-learn's default there: 200): the same 15-NN label agreement at train size
# and 200k in half the time (bench/scale.py --sections map prints it beside main's map)
UMAP_EPOCHS = 100
CHUNK = 32_768  # embeddings read and placed at a time (128 MB of 1,024 floats)
PCA_DIMS_BEFORE_UMAP = 50  # UMAP's neighbour search grows with the dimension; 50 components keep neighbourhoods


def view_names(eval_key: str) -> Dict[str, str]:
    return {"saved_view": f"{eval_key}-disagreements", "mistakenness_view": f"{eval_key}-mistakenness",
            "rule_view": f"{eval_key}-rule-differs"}


# What each label shows on a patch: FiftyOne 1.22.1 keeps this per browser (localStorage
# `shownLabelAttributes-<dataset id>`, default: the label only), not in the dataset's app_config
SHOWN_LABEL_ATTRIBUTES = {"ground_truth": ["label", "predicted_label", "predicted_confidence", "mistakenness",
                                           "rule_label"], "model_predictions": ["label", "confidence"]}


def shown_label_attributes(ds, field: str = "model_predictions") -> Dict[str, str]:
    """The browser storage entry that makes the App show truth, prediction, confidence, mistakenness and the rule's
    label on every patch without clicks: {key: JSON value}. Whatever opens the App seeds it where the browser has
    none yet (a user's own choice is kept); see `seed_script`."""
    import json
    shown = {"ground_truth": SHOWN_LABEL_ATTRIBUTES["ground_truth"], field: SHOWN_LABEL_ATTRIBUTES["model_predictions"]}
    return {f"shownLabelAttributes-{ds._doc.id}": json.dumps(shown)}  # private API (fiftyone 1.22.1): the App's id


def seed_script(entries: Dict[str, str]) -> str:
    """JavaScript that sets each entry of `entries` in localStorage unless the browser already has one."""
    import json
    return "".join(f"if (localStorage.getItem({json.dumps(k)}) === null) localStorage.setItem({json.dumps(k)}, "
                   f"{json.dumps(v)});" for k, v in entries.items())


def review_patches(view, field: str, eval_key: str, disagreements_only: bool, rule_differs: bool = False,
                   top: Optional["Top"] = None):
    """Ground-truth patches of the ROIs with a prediction, each carrying its own prediction box (only those the
    model got wrong, or those where the expected-distance rule answers otherwise, when asked); with `top`, only the
    first REVIEW_LIMIT ROIs in the view's order (their samples found by index, so the patches made are few)."""
    from fiftyone import ViewField as F

    has_prediction = F(f"{eval_key}_id") != ""
    wanted = (F(eval_key) == "fn") & has_prediction if disagreements_only else has_prediction
    if rule_differs:
        wanted = has_prediction & F("rule_label").exists() & (F("rule_label") != F("predicted_label"))
    if top is not None:
        view = view.select(top.sample_ids)
        if top.threshold is not None:
            wanted = wanted & (F(top.attribute) >= top.threshold if top.largest else F(top.attribute) <= top.threshold)
    patches = view.filter_labels("ground_truth", wanted).to_patches("ground_truth", other_fields=[field])
    # "$ground_truth" is the patch's own ground-truth detection: keep only the prediction matched to it
    return patches.filter_labels(field, F("_id").to_string() == F(f"$ground_truth.{eval_key}_id"), only_matches=False)


REVIEW_LIMIT = 25_000  # patches a review view holds at most (the train split's 23,699 ROIs fit whole)
INDEXED = ("split", "image_id", "ground_truth.detections.annotation_id", "ground_truth.detections.mistakenness",
           "ground_truth.detections.predicted_confidence")  # and <field>.detections.confidence


@dataclass
class Top:
    """The first REVIEW_LIMIT ROIs of a review view: their samples, and the sort key's value at the limit (None where
    the key is missing there, as confidence is for CSV predictions: the samples alone then bound the view)."""

    sample_ids: List[str]
    attribute: str  # on the ground-truth detection
    threshold: Optional[float]
    largest: bool


def top_of(view, values: RoiValues, rows: "np.ndarray", score: "np.ndarray", attribute: str,
           largest: bool) -> Optional[Top]:
    """None when the ROIs `rows` (of `values`) fit in a view, else their first REVIEW_LIMIT by `score`, found in the
    database through the annotation-id index."""
    import numpy as np

    if rows.sum() <= REVIEW_LIMIT:
        return None
    candidates = np.flatnonzero(rows)
    ranked = candidates[np.argsort(-score[candidates] if largest else score[candidates], kind="stable")]  # NaN last
    chosen = ranked[:REVIEW_LIMIT]
    aids = values.annotation_id[chosen].tolist()
    sample_ids = view.mongo([{"$match": {"ground_truth.detections.annotation_id": {"$in": aids}}}]).values("id")
    at_limit = float(score[chosen[-1]])
    return Top(sample_ids, attribute, at_limit if np.isfinite(at_limit) else None, largest)


def create_indexes(ds, field: str) -> None:
    """Indexes on what the saved views and the App filter and sort on (split, image, annotation, mistakenness,
    confidence): a 2M-ROI split is then matched and sorted without scanning it (`create_index` keeps existing
    ones)."""
    for path in INDEXED + (f"{field}.detections.confidence",):
        ds.create_index(path)


def save_views(ds, view, field: str, eval_key: str, values: RoiValues) -> Dict[str, str]:
    """The disagreements, most confident first, every predicted ROI by mistakenness, most likely wrong first, and
    (where the split has the expected-distance rule's labels) the ROIs where the rule answers otherwise than
    argmax, least confident first; each the first REVIEW_LIMIT ROIs in that order (every ROI in the file, with its
    scores, is in the report's rois.csv)."""
    names = view_names(eval_key)
    create_indexes(ds, field)
    predicted = values.image_id >= 0
    wrong = predicted & ~values.correct if values.correct is not None else predicted
    ds.save_view(names["saved_view"], review_patches(
        view, field, eval_key, True, top=top_of(view, values, wrong, values.confidence, "predicted_confidence", True))
                 .sort_by("ground_truth.predicted_confidence", reverse=True), overwrite=True)
    ds.save_view(names["mistakenness_view"], review_patches(
        view, field, eval_key, False, top=top_of(view, values, predicted, values.mistakenness, "mistakenness", True))
                 .sort_by("ground_truth.mistakenness", reverse=True), overwrite=True)
    if values.rule_label is not None:
        differs = predicted & (values.rule_label != values.label)
        ds.save_view(names["rule_view"], review_patches(
            view, field, eval_key, False, rule_differs=True,
            top=top_of(view, values, differs, values.confidence, "predicted_confidence", False))
                     .sort_by("ground_truth.predicted_confidence"), overwrite=True)
    else:
        names.pop("rule_view")
        if ds.has_saved_view(f"{eval_key}-rule-differs"):  # from a run with logits: now stale
            ds.delete_saved_view(f"{eval_key}-rule-differs")
    return names


def brain_key(eval_key: str) -> str:
    return f"{eval_key}_embeddings"


def visualize(ds, view, embeddings_path: Path, key: str, seed: Optional[int] = None) -> Dict[str, object]:
    """A 2-D visualization of the ground-truth patches that have an embedding, under brain run `key`
    (replaced if present; other brain runs kept). The points come from `map_2d`, which reads the embeddings in
    chunks (never all at once), and are stored as a Brain run of precomputed points (its method reads `manual`),
    which the App's Embeddings panel draws like any other."""
    import fiftyone.brain as fob
    import numpy as np
    from fiftyone import ViewField as F

    from fathompipe.embeddings import load_embeddings

    ids, emb = load_embeddings(embeddings_path)
    in_view = np.asarray([-1 if aid is None else aid for aids in view.values("ground_truth.detections.annotation_id")
                          for aid in aids or []], np.int64)  # -1: a box added by hand
    at = np.searchsorted(ids, in_view).clip(0, max(len(ids) - 1, 0))
    has = (ids[at] == in_view) & (in_view >= 0) if len(ids) else np.zeros(len(in_view), bool)
    missing = np.unique(in_view[~has & (in_view >= 0)])  # skipped by infer: no embedding
    roi_view = view.filter_labels("ground_truth", F("annotation_id").exists() & ~F("annotation_id").is_in(
        missing.tolist())) if not has.all() else view
    if key in ds.list_brain_runs():
        ds.delete_brain_run(key)
    if has.sum() < 2:
        return {"brain_key": None, "embedded_rois": int(has.sum()), "visualization": "none (fewer than 2 ROIs)"}
    points, method = map_2d(emb, at[has], seed)  # the rows of roi_view's patches, in their order
    # with patches_field, FiftyOne Brain takes the points of every patch in the view's order, which `at[has]` is
    fob.compute_visualization(roi_view, patches_field="ground_truth", points=points, brain_key=key, progress=False)
    return {"brain_key": key, "embedded_rois": int(has.sum()), "visualization": method}


def map_2d(vectors, rows: Optional["np.ndarray"] = None, seed: Optional[int] = None,
           sample: Optional[int] = None, epochs: Optional[int] = None) -> Tuple["np.ndarray", str]:
    """(points (len(rows), 2), method) for `vectors[rows]` (every row by default), in the order of `rows`.
    `vectors` may be an embeddings.Rows (read from the file on demand): rows are read CHUNK at a time, never all at
    once.

    Up to `sample` (UMAP_SAMPLE) ROIs: UMAP on 50 PCA components, from sklearn's exact 15-nearest-neighbour graph,
    so umap-learn skips pynndescent's index (bench/evaluate.py). Beyond that (a deployment's 2M ROIs, where the
    exact graph grows as N^1.9), PCA and UMAP are fitted on `sample` ROIs drawn at random and umap-learn's
    `transform` places every other ROI in chunks near its nearest fitted neighbours: linear time, and each
    label's neighbourhoods kept (bench/scale.py --sections map measures both against the exact map: fitted on
    150,000 ROIs the 15-NN label agreement stays within 0.02 of the exact map's at 200k ROIs; on 50,000 it did
    not). The PCA is fitted on at most PCA_SAMPLE ROIs. UMAP optimizes the layout for `epochs` (UMAP_EPOCHS above
    10,000 ROIs; umap-learn's own default below). PCA alone without umap-learn or with fewer than UMAP_MIN_POINTS
    ROIs. No seed by default: umap-learn runs on one thread when seeded."""
    import numpy as np
    from sklearn.decomposition import PCA

    sample = sample or UMAP_SAMPLE
    rows = np.arange(len(vectors)) if rows is None else np.asarray(rows)
    n = len(rows)
    rng = np.random.default_rng(0)
    fitted = np.arange(n) if n <= sample else np.sort(rng.choice(n, sample, replace=False))
    on_pca = fitted if len(fitted) <= PCA_SAMPLE else np.sort(rng.choice(fitted, PCA_SAMPLE, replace=False))
    pca_vectors = np.asarray(vectors[rows[on_pca]], np.float32)
    if n < UMAP_MIN_POINTS or not umap_available():
        pca = PCA(2, random_state=0).fit(pca_vectors)
        return _in_chunks(vectors, rows, pca.transform), "pca"
    import umap

    _cache_umap_compilation()
    reduce = PCA(PCA_DIMS_BEFORE_UMAP, random_state=0).fit(pca_vectors).transform \
        if pca_vectors.shape[1] > PCA_DIMS_BEFORE_UMAP else (lambda block: np.asarray(block, np.float32))
    del pca_vectors
    fit_vectors = _in_chunks(vectors, rows[fitted], reduce)
    epochs = epochs or (UMAP_EPOCHS if len(fitted) > 10_000 else None)
    with warnings.catch_warnings():  # expected, so kept out of job logs: well-separated classes
        warnings.filterwarnings("ignore", message="Graph is not fully connected", category=UserWarning)
        if n <= sample:
            from sklearn.neighbors import NearestNeighbors
            distances, indices = NearestNeighbors(n_neighbors=UMAP_NEIGHBOURS).fit(fit_vectors).kneighbors(
                fit_vectors)
            reducer = umap.UMAP(n_components=2, n_neighbors=UMAP_NEIGHBOURS, precomputed_knn=(indices, distances),
                                n_epochs=epochs, random_state=seed)
            # expected: an exact graph leaves no index for `transform`, which this path never uses
            warnings.filterwarnings("ignore", message="precomputed_knn", category=UserWarning)
            return reducer.fit_transform(fit_vectors), "umap"
        reducer = umap.UMAP(n_components=2, n_neighbors=UMAP_NEIGHBOURS, n_epochs=epochs,
                            random_state=seed).fit(fit_vectors)
        points = np.empty((n, 2), np.float32)
        points[fitted] = reducer.embedding_
        rest = np.setdiff1d(np.arange(n), fitted)
        points[rest] = _in_chunks(vectors, rows[rest], lambda block: reducer.transform(reduce(block)))
    return points, f"umap, fitted on {sample:,} ROIs drawn at random, the other {n - sample:,} placed by its transform"


def _in_chunks(vectors, rows: "np.ndarray", place) -> "np.ndarray":
    """place(vectors[chunk of rows]) for every chunk, concatenated: the embeddings read CHUNK rows at a time."""
    import numpy as np
    out = [np.asarray(place(np.asarray(vectors[rows[start:start + CHUNK]], np.float32)), np.float32)
           for start in range(0, len(rows), CHUNK)]
    return np.concatenate(out)


def warm_map_cache() -> None:
    """Run `map_2d` on random vectors (setup.sh), both ways (exact, and fitted on a sample then placed): the same
    compiled functions as a real map, now on disk."""
    import numpy as np
    vectors = np.random.default_rng(0).normal(size=(8 * UMAP_MIN_POINTS, 2 * PCA_DIMS_BEFORE_UMAP)).astype(np.float32)
    map_2d(vectors)
    map_2d(vectors, sample=4 * UMAP_MIN_POINTS)


def _cache_umap_compilation() -> None:
    """Let numba keep umap-learn's and pynndescent's compiled functions on disk (`enable_caching`, what
    `cache=True` does; numba 0.68, umap-learn 0.5.12), so only the first evaluate job on a kind of node pays for
    compiling them."""
    import pynndescent.distances
    import pynndescent.pynndescent_
    import pynndescent.rp_trees
    import pynndescent.utils
    import umap.layouts
    import umap.umap_
    import umap.utils
    from numba.core.registry import CPUDispatcher

    for module in (umap.umap_, umap.layouts, umap.utils, pynndescent.pynndescent_, pynndescent.rp_trees,
                   pynndescent.utils, pynndescent.distances):
        for function in vars(module).values():
            if isinstance(function, CPUDispatcher):
                function.enable_caching()


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def embeddings_beside(predictions: Path) -> Optional[Path]:
    """The infer stage's embeddings file beside `predictions` (csv or parquet), if it wrote one (today's format, or
    an earlier version's)."""
    from fathompipe.layout import OutputFiles
    out = OutputFiles(Path(predictions).with_suffix(".csv"))
    return next((p for p in (out.embeddings, out.legacy_embeddings) if p.exists()), None)
