"""The winner's preprocessing, reproduced exactly, with each image decoded once.

Per ROI the reference cuts an object square and context windows of 3x and 5x the box and the whole
image, resizes each to 256x256 (Pillow bicubic, aspect not kept) and normalizes with the DINOv2
ImageNet statistics (shared/notes/reference-pipeline.md, part A). This module gives the same
pixels, differing only where the reference crashes or is silent:

- every PIL mode works: palette, 16-bit, 1-bit, CMYK ... are converted to RGB (the reference raises
  IndexError on them); RGB, RGBA, LA and L behave exactly as in the reference;
- crops that the reference's numpy slicing makes empty (boxes beyond the image) or very large
  (negative slice ends for boxes far above or left of it) give the reference's result, on purpose,
  and are reported per ROI;
- the whole-image context is identical for every ROI of an image, so it is resized once per image,
  as is any other window that repeats (a large box's 5x context is the whole image).

Two paths give the same bytes (infer.resize): `crop_image` decodes, crops and resizes with Pillow in a
DataLoader worker (cpu); or the worker only decodes and `plan_crops` names the windows, which
fathompipe.model.resize crops and resizes on the inference device (device). Either way the model
gets uint8 HWC crops; normalization (`normalize_uint8`) runs on the device as a lookup table that is
bit-identical to the reference's float64 rescale then float32 normalize.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

try:  # libspng decodes PNG about 1.5x faster than Pillow; PNG is lossless, so the pixels are identical
    import pyspng
except ImportError:  # pragma: no cover - optional speed-up
    pyspng = None

CROP = 256
SCALES: Tuple[int, ...] = (3, 5, -1)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESCALE = 0.00392156862745098


@dataclass
class ImageCrops:
    """All model inputs of one image, uint8 (N, 256, 256, 3) per context, and what was odd."""

    obj: np.ndarray
    env: dict[int, np.ndarray]  # scale -> crops; scale -1 holds the distinct whole-image crops
    whole_index: np.ndarray  # per ROI, its row in env[-1] (almost always 0: one per image)
    notes: List[str] = field(default_factory=list)  # per ROI, "" when nothing was unusual
    image_note: str = ""


def open_image(path: str | Path) -> Tuple[Image.Image, str]:
    """Open as the reference does (format from content, no EXIF transpose), and make the modes it
    cannot handle usable. Returns the image and a note when its mode was converted."""
    image = Image.open(path)
    mode = image.mode
    if mode in ("RGB", "RGBA", "LA"):
        return image, ""
    if mode == "L":
        return image.convert("RGB"), ""  # the reference's only conversion
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the high byte, as Pillow does for 48-bit RGB
        arr = np.asarray(image, dtype=np.uint32) >> 8
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L").convert("RGB"), f"mode {mode} -> RGB"
    if mode == "P" and "transparency" in image.info:
        return image.convert("RGBA"), "mode P -> RGBA"
    return image.convert("RGB"), f"mode {mode} -> RGB"


def decode(path: str | Path) -> Tuple[np.ndarray, str]:
    """The image as the reference sees it after its mode handling: HxWxC uint8, C in {2, 3, 4}."""
    image = Image.open(path)  # reads the header only
    with image:
        if (pyspng is not None and image.format == "PNG" and image.mode == "RGB"
                and "transparency" not in image.info):
            arr = pyspng.load(Path(path).read_bytes())
            if arr.dtype == np.uint16:
                arr = (arr >> 8).astype(np.uint8)  # Pillow reads 48-bit RGB as its high bytes
            if arr.ndim == 3 and arr.shape[2] == 3:
                return arr, ""
        converted, note = open_image(path)
        with converted:
            return np.asarray(converted), note


def _resize(arr: np.ndarray) -> np.ndarray:
    """Pillow's default-filter resize of a crop to 256x256, then convert('RGB') as the processor
    does. An empty crop gives black, as Pillow does for the reference. fathompipe.model.resize
    computes the same bytes on the inference device."""
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        return np.zeros((CROP, CROP, 3), np.uint8)
    im = _to_pil(arr).resize((CROP, CROP))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


_MODES = {2: "LA", 3: "RGB", 4: "RGBA"}


def _to_pil(arr: np.ndarray) -> Image.Image:
    """Image.fromarray without its zero fill of the new image (8% of preprocessing time)."""
    im = Image.new(_MODES[arr.shape[2]], (arr.shape[1], arr.shape[0]), None)
    im.frombytes(np.ascontiguousarray(arr))
    return im


Window = Tuple[int, int, int, int]  # (y0, y1, x0, x1) as numpy slicing reads the reference's window: 0 <= y0 <= y1


def _extent(start: int, stop: int, size: int) -> Tuple[int, int]:
    """What numpy's [start:stop] selects along an axis of `size`: a negative stop counts from the end."""
    first, last, _ = slice(start, stop).indices(size)
    return first, max(first, last)


def roi_windows(bbox: Sequence[float], height: int, width: int) -> dict[str, Tuple[int, int, int, int]]:
    """The reference's crop windows (y1, y2, x1, x2) for the object and each context scale, with
    its float floor division and truncation kept verbatim. Scale -1 is the whole image unless the
    box centre lies beyond the image's longer side."""
    x, y, w, h = bbox
    cx = int(x + w // 2)
    cy = int(y + h // 2)
    out: dict[str, Tuple[int, int, int, int]] = {}
    for s in SCALES:
        half = max(height, width) if s == -1 else (max(w, h) // 2) * s
        out[f"env{s}"] = (int(max(cy - half, 0)), int(min(cy + half, height)),
                          int(max(cx - half, 0)), int(min(cx + half, width)))
    n = max(w, h) // 2
    out["obj"] = (max(int(cy - n - 1), 0), min(int(cy + n + 1), height),
                  max(int(cx - n - 1), 0), min(int(cx + n + 1), width))
    return out


def _describe(name: str, raw: Tuple[int, int, int, int], win: Window) -> str:
    y0, y1, x0, x1 = win
    if y1 == y0 or x1 == x0:
        return f"{name} crop empty (box outside the image): black, as the reference"
    if raw[1] < 0 or raw[3] < 0:
        return f"{name} crop has a negative end (box far outside): {x1 - x0}x{y1 - y0}, as the reference"
    return ""


@dataclass
class CropPlan:
    """The distinct windows one image's ROIs need, and which ROI uses which: equal windows are resized once
    (e.g. a large box's 5x context is the whole image), the whole-image crop once per image."""

    windows: List[Window]
    obj: np.ndarray  # per ROI, its row in `windows`; env3 and env5 likewise
    env3: np.ndarray
    env5: np.ndarray
    whole: np.ndarray  # rows in `windows` of the distinct whole-image crops
    whole_index: np.ndarray  # per ROI, its row in `whole` (almost always 0: one per image)
    notes: List[str]  # per ROI, "" when nothing was unusual


def plan_crops(height: int, width: int, bboxes: Sequence[Sequence[float]]) -> CropPlan:
    """Every ROI's four windows on an image of height x width, deduplicated, with what was odd about them."""
    rows: dict[Window, int] = {}
    wholes: dict[int, int] = {}
    n = len(bboxes)
    index = {name: np.empty(n, np.int64) for name in ("obj", "env3", "env5", "env-1")}
    whole_index = np.empty(n, np.int64)
    notes: List[str] = []
    for i, bbox in enumerate(bboxes):
        why: List[str] = []
        for name, raw in roi_windows(bbox, height, width).items():
            win = (*_extent(raw[0], raw[1], height), *_extent(raw[2], raw[3], width))
            why.append(_describe(name, raw, win))
            index[name][i] = rows.setdefault(win, len(rows))
            if name == "env-1":
                whole_index[i] = wholes.setdefault(int(index[name][i]), len(wholes))
        notes.append("; ".join(w for w in why if w))
    return CropPlan(list(rows), index["obj"], index["env3"], index["env5"],
                    np.array(list(wholes), dtype=np.int64), whole_index, notes)


def crop_image(path: str | Path, bboxes: Sequence[Sequence[float]]) -> ImageCrops:
    """Decode `path` once and cut every ROI's four 256x256 inputs from it, resized with Pillow (the CPU path)."""
    arr, image_note = decode(path)
    plan = plan_crops(arr.shape[0], arr.shape[1], bboxes)
    if not plan.windows:
        empty = np.empty((0, CROP, CROP, 3), np.uint8)
        return ImageCrops(empty, {3: empty, 5: empty, -1: empty}, plan.whole_index, plan.notes, image_note)
    resized = np.stack([_resize(arr[y0:y1, x0:x1, :]) for y0, y1, x0, x1 in plan.windows])
    env = {3: resized[plan.env3], 5: resized[plan.env5], -1: resized[plan.whole]}
    return ImageCrops(resized[plan.obj], env, plan.whole_index, plan.notes, image_note)


def normalization_lut() -> torch.Tensor:
    """(3, 256) float32: for channel c and byte v, float32(float64(v) * 1/255) normalized in float32
    exactly as BitImageProcessor does, so a gather reproduces the reference bit for bit."""
    rescaled = (np.arange(256, dtype=np.float64) * RESCALE).astype(np.float32)
    mean = np.asarray(MEAN, dtype=np.float32)[:, None]
    std = np.asarray(STD, dtype=np.float32)[:, None]
    return torch.from_numpy((rescaled[None, :] - mean) / std)


def normalize_uint8(batch: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) model input, on whatever device `batch` is:
    one gather into the flattened (3 x 256) table."""
    offsets = torch.tensor([0, 256, 512], device=batch.device).view(1, 3, 1, 1)
    return lut.to(batch.device).flatten()[batch.permute(0, 3, 1, 2).long() + offsets]
