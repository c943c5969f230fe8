"""The winner's preprocessing for one ROI, written straight from shared/notes/reference-pipeline.md.

Independent of fathompipe.model.preprocess on purpose: the tests check fathompipe against it, and the
benchmark times it as the straightforward per-ROI baseline (reopening the image for every ROI, as
C1.TestModel.py's dataset does).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image

MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
STD = np.asarray([0.229, 0.224, 0.225], np.float32)
RESCALE = 0.00392156862745098


def numpy_processor(im: Image.Image) -> np.ndarray:
    """BitImageProcessor's steps: convert RGB, (identity resize), float64 rescale, float32 normalize, CHW."""
    if im.mode != "RGB":
        im = im.convert("RGB")
    a = (np.asarray(im).astype(np.float64) * RESCALE).astype(np.float32)
    return ((a - MEAN) / STD).transpose(2, 0, 1)


def reference_roi(path: str | Path, bbox: Sequence[float],
                  processor: Optional[Callable[[Image.Image], np.ndarray]] = None) -> List[np.ndarray]:
    """[object, context x3, context x5, whole image] float32 (3, 256, 256) inputs for one ROI."""
    process = processor or numpy_processor
    image = Image.open(path)
    if image.mode == "L":
        image = image.convert("RGB")
    W, H = image.size
    x, y, w, h = bbox
    cx, cy = int(x + w // 2), int(y + h // 2)
    arr = np.array(image)
    crops = []
    for s in (3, 5, -1):
        half = max(H, W) if s == -1 else (max(w, h) // 2) * s
        y1, y2 = int(max(cy - half, 0)), int(min(cy + half, H))
        x1, x2 = int(max(cx - half, 0)), int(min(cx + half, W))
        crops.append(Image.fromarray(arr[y1:y2, x1:x2, :]))
    n = max(w, h) // 2
    obj = Image.fromarray(arr[max(int(cy - n - 1), 0):min(int(cy + n + 1), H),
                              max(int(cx - n - 1), 0):min(int(cx + n + 1), W), :])
    return [process(im.resize((256, 256))) for im in [obj] + crops]
