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
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple

if TYPE_CHECKING:
    import numpy as np

UMAP_MIN_POINTS = 30  # below this UMAP's 15 neighbours describe little: PCA instead
UMAP_NEIGHBOURS = 15  # umap-learn's (and FiftyOne Brain's) default
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


def review_patches(view, field: str, eval_key: str, disagreements_only: bool, rule_differs: bool = False):
    """Ground-truth patches of the ROIs with a prediction, each carrying its own prediction box (only those the
    model got wrong, or those where the expected-distance rule answers otherwise, when asked)."""
    from fiftyone import ViewField as F

    has_prediction = F(f"{eval_key}_id") != ""
    wanted = (F(eval_key) == "fn") & has_prediction if disagreements_only else has_prediction
    if rule_differs:
        wanted = has_prediction & F("rule_label").exists() & (F("rule_label") != F("predicted_label"))
    patches = view.filter_labels("ground_truth", wanted).to_patches("ground_truth", other_fields=[field])
    # "$ground_truth" is the patch's own ground-truth detection: keep only the prediction matched to it
    return patches.filter_labels(field, F("_id").to_string() == F(f"$ground_truth.{eval_key}_id"), only_matches=False)


def save_views(ds, view, field: str, eval_key: str, rule: bool = False) -> Dict[str, str]:
    """The disagreements, most confident first, every predicted ROI by mistakenness, most likely wrong first, and
    (`rule`: the split has the expected-distance rule's labels) the ROIs where the rule answers otherwise than
    argmax, least confident first."""
    names = view_names(eval_key)
    ds.save_view(names["saved_view"], review_patches(view, field, eval_key, True)
                 .sort_by("ground_truth.predicted_confidence", reverse=True), overwrite=True)
    ds.save_view(names["mistakenness_view"], review_patches(view, field, eval_key, False)
                 .sort_by("ground_truth.mistakenness", reverse=True), overwrite=True)
    if rule:
        ds.save_view(names["rule_view"], review_patches(view, field, eval_key, False, rule_differs=True)
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
    (replaced if present; other brain runs kept). The points come from `map_2d` and are stored as a Brain run
    of precomputed points (its method reads `manual`), which the App's Embeddings panel draws like any other."""
    import fiftyone.brain as fob
    import numpy as np
    from fiftyone import ViewField as F

    from fathompipe.embeddings import load_embeddings

    ids, emb = load_embeddings(embeddings_path)
    known = set(ids.tolist())
    in_view = [aid for aids in view.values("ground_truth.detections.annotation_id") for aid in aids or []]
    missing = set(in_view) - known  # ROIs without an embedding: skipped by infer, or added by hand (None)
    roi_view = view.filter_labels("ground_truth", F("annotation_id").exists() & ~F("annotation_id").is_in(
        sorted(missing - {None}))) if missing else view
    order = np.asarray([aid for aid in in_view if aid in known], np.int64)  # the patches of roi_view, in order
    if key in ds.list_brain_runs():
        ds.delete_brain_run(key)
    if len(order) < 2:
        return {"brain_key": None, "embedded_rois": int(len(order)), "visualization": "none (fewer than 2 ROIs)"}
    points, method = map_2d(emb[np.searchsorted(ids, order)].astype(np.float32), seed)
    # with patches_field, FiftyOne Brain takes the points of every patch in the view's order, which `order` is
    fob.compute_visualization(roi_view, patches_field="ground_truth", points=points, brain_key=key, progress=False)
    return {"brain_key": key, "embedded_rois": int(len(order)), "visualization": method}


def map_2d(vectors, seed: Optional[int] = None) -> Tuple["np.ndarray", str]:
    """(points (N, 2), method). UMAP when umap-learn is installed and there are enough points: on 50 PCA
    components, from sklearn's exact 15-nearest-neighbour graph, so umap-learn skips pynndescent, whose numba
    compilation in every fresh job cost more than the map itself (bench/evaluate.py). Else PCA.
    No seed by default: umap-learn runs on one thread when seeded."""
    from sklearn.decomposition import PCA

    if len(vectors) < UMAP_MIN_POINTS or not umap_available():
        return PCA(2, random_state=0).fit_transform(vectors), "pca"
    import umap
    from sklearn.neighbors import NearestNeighbors

    _cache_umap_compilation()

    if vectors.shape[1] > PCA_DIMS_BEFORE_UMAP:
        vectors = PCA(PCA_DIMS_BEFORE_UMAP, random_state=0).fit_transform(vectors)
    distances, indices = NearestNeighbors(n_neighbors=UMAP_NEIGHBOURS).fit(vectors).kneighbors(vectors)
    reducer = umap.UMAP(n_components=2, n_neighbors=UMAP_NEIGHBOURS, precomputed_knn=(indices, distances),
                        random_state=seed)
    # expected, so kept out of job logs: no `transform` for new data (never used), and well-separated classes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="precomputed_knn", category=UserWarning)
        warnings.filterwarnings("ignore", message="Graph is not fully connected", category=UserWarning)
        return reducer.fit_transform(vectors), "umap"


def warm_map_cache() -> None:
    """Run `map_2d` once on random vectors (setup.sh): the same compiled functions as a real map, now on disk."""
    import numpy as np
    map_2d(np.random.default_rng(0).normal(size=(4 * UMAP_MIN_POINTS, 2 * PCA_DIMS_BEFORE_UMAP)).astype(np.float32))


def _cache_umap_compilation() -> None:
    """Let numba keep umap-learn's compiled functions on disk (`enable_caching`, what `cache=True` does; numba
    0.68, umap-learn 0.5.12), so only the first evaluate job on a kind of node pays for compiling them."""
    import umap.layouts
    import umap.umap_
    import umap.utils
    from numba.core.registry import CPUDispatcher

    for module in (umap.umap_, umap.layouts, umap.utils):
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
