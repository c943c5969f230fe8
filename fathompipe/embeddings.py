"""The per-ROI embeddings file (OUT.embeddings.npz): written by the infer stage, read by the evaluate stage.

One format, two arrays: `annotation_id` (N,) int64 ascending and `embeddings` (N, D) float32, row i for
annotation_id[i]. Free of torch, so the evaluate job reads it without loading the model's stack.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Tuple

import numpy as np

from fathompipe import atomic


def write_embeddings(path: Path, ids: List[np.ndarray], embeddings: List[np.ndarray]) -> int:
    """OUT.embeddings.npz: `annotation_id` (ascending) and `embeddings` (N, D) float32, row i for id i."""
    if not ids:
        path.unlink(missing_ok=True)  # none asked for (infer.embeddings=false): no stale file from an earlier run
        return 0
    ann_id = np.concatenate(ids)
    order = np.argsort(ann_id, kind="stable")
    buf = io.BytesIO()
    np.savez(buf, annotation_id=ann_id[order], embeddings=np.concatenate(embeddings)[order])
    atomic.write_bytes(path, buf.getvalue())
    return len(ann_id)


def load_embeddings(path: str | Path) -> Tuple["np.ndarray", "np.ndarray"]:
    """(annotation_id (N,) int64 ascending, embeddings (N, D) float32) from OUT.embeddings.npz."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embeddings {path} do not exist (the infer stage writes them beside its predictions)")
    with np.load(path) as z:
        if not {"annotation_id", "embeddings"} <= set(z.files):
            raise ValueError(f"{path}: expected arrays annotation_id and embeddings, found {sorted(z.files)}")
        ids, emb = z["annotation_id"], z["embeddings"]
    if emb.ndim != 2 or len(ids) != len(emb):
        raise ValueError(f"{path}: embeddings of shape {emb.shape} do not match {len(ids)} annotation ids")
    return ids, emb
