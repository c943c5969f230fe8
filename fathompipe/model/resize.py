"""Pillow's bicubic `Image.resize`, bit for bit, as integer tensor operations on any device.

Pillow (src/libImaging/Resample.c, 8 bits per channel) resizes in two separable passes. Per output
pixel it sums `pixel * k` over the filter's taps in 32-bit integers, where `k` is the bicubic weight
(a = -0.5) computed in double precision, normalized by the taps' sum and rounded to 22 fractional
bits; the result is `(2^21 + sum) >> 22` clipped to 0..255, and the first pass's output is rounded
and clipped that way too before the second pass reads it. This module does the same with the same
integers: the weights are computed once per (input size, output size) in float64 exactly as Pillow's
C does (cached), and each pass is a gather of every output pixel's taps, an int32 multiply and an
integer sum, batched over all the crops of a batch. No float touches a pixel, so the result does not
depend on the device, its TF32 settings or the order of the sums.

What `Image.resize(size)` adds around the passes, reproduced here (measured against Pillow 13.0.0,
tests/test_resize.py):
- pass order: Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice
  as many pixels as the width (`h > out_h and h - out_h > 2 * (w - out_w)`); Pillow 11 and 12 always
  ran the horizontal pass first (PILLOW_VERTICAL_FIRST);
- RGBA and LA are resized premultiplied (RGBa, La) and un-premultiplied after, with Pillow's integer
  conversions; an image already of the output size is returned as is (no premultiplication);
- a pass whose input and output sizes are equal is the identity (its only non-zero weight is 2^22).

Overflow: Pillow accumulates in int32 with 2 spare bits. `coefficients` checks for every table that
255 times the sum of its positive (negative) weights plus 2^21 stays inside int32, so neither
Pillow's sums nor ours overflow; ours are summed in int64 anyway.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import PIL
import torch

PRECISION_BITS = 22
HALF = 1 << (PRECISION_BITS - 1)
# Pillow 13 changed the pass order for images whose height shrinks much more than their width
# (python-pillow/Pillow#9549); the rule in `vertical_first` is the one measured on 13.0.0.
PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13
# Elements (lines x outputs x taps x channels) gathered at once: bounds the temporary memory of a pass
# to about 16M x (1 byte gathered + 4 multiplied) + 8 bytes per index, whatever the crop sizes.
CHUNK_ELEMENTS = 1 << 24


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Resample.c's bicubic_filter (a = -0.5), term for term in the same order as its C."""
    x = np.abs(x)
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=16384)
def coefficients(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for the box (0, in_size): per output pixel its
    first input tap (int64, (out,)) and its int32 weights ((out, ksize), zero past its last tap)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"cannot resize {in_size} pixels to {out_size}")
    # the box arrives as float32 and in1 - in0 is computed in float32 before the cast (_imaging.c)
    scale = float(np.float32(in_size) - np.float32(0.0)) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    arg = ((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(taps[None, :] < xmax[:, None], _bicubic(arg), 0.0)
    ww = np.cumsum(w, axis=1)[:, -1:]  # a sequential sum, tap by tap, as the C loop adds them
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ww != 0.0, w / ww, w)
    scaled = w * (1 << PRECISION_BITS)
    kk = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    positive, negative = np.where(kk > 0, kk, 0).sum(1), np.where(kk < 0, kk, 0).sum(1)
    if (255 * positive + HALF).max() >= 2**31 or (255 * negative + HALF).min() < -2**31:  # pragma: no cover
        raise OverflowError(f"bicubic {in_size} -> {out_size}: int32 sums could overflow")
    return xmin, kk.astype(np.int32)


def vertical_first(height: int, width: int, out_height: int, out_width: int) -> bool:
    """Whether Pillow runs the vertical pass first for this resize (measured rule, see the module doc)."""
    return PILLOW_VERTICAL_FIRST and height > out_height and height - out_height > 2 * (width - out_width)


@dataclass
class _Lines:
    """One pass over many 1-D lines of pixels in a (pixels, C) buffer: line i starts at pixel base[i],
    steps by stride[i] pixels, has length[i] pixels and is resized to `out` pixels."""

    base: np.ndarray
    stride: np.ndarray
    length: np.ndarray
    out: int


def _resample(pixels: torch.Tensor, lines: _Lines) -> torch.Tensor:
    """(lines, out, C) uint8: Pillow's ImagingResampleHorizontal_8bpc along every line. Lines are grouped
    by tap count, so a small crop's lines are not padded to a large crop's filter length."""
    device, channels = pixels.device, pixels.shape[1]
    result = torch.empty((len(lines.length), lines.out, channels), dtype=torch.uint8, device=device)
    sizes, line_table = np.unique(lines.length, return_inverse=True)
    tables = [coefficients(int(s), lines.out) for s in sizes]
    ksizes = np.array([t[1].shape[1] for t in tables])
    for k in np.unique(ksizes):
        members = np.flatnonzero(ksizes[line_table] == k)
        in_group = np.flatnonzero(ksizes == k)
        starts = torch.from_numpy(np.stack([tables[i][0] for i in in_group])).to(device)
        weights = torch.from_numpy(np.stack([tables[i][1] for i in in_group])).to(device)
        local = np.empty(len(sizes), np.int64)
        local[in_group] = np.arange(len(in_group))
        taps = torch.arange(int(k), device=device)
        step = max(1, CHUNK_ELEMENTS // (lines.out * int(k) * channels))
        for lo in range(0, len(members), step):
            rows = members[lo:lo + step]
            table = torch.from_numpy(local[line_table[rows]]).to(device)
            base, stride, last = (torch.from_numpy(a[rows]).to(device)[:, None, None]
                                  for a in (lines.base, lines.stride, lines.length - 1))
            index = base + torch.minimum(starts[table][:, :, None] + taps, last) * stride  # (l, out, k)
            acc = (pixels[index] * weights[table][..., None]).sum(2)  # uint8 x int32 -> int32, summed in int64
            result[torch.from_numpy(rows).to(device)] = ((acc + HALF) >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)
    return result


def _two_passes(pixels: torch.Tensor, crops: np.ndarray, size: Tuple[int, int], vfirst: bool) -> torch.Tensor:
    """(n, out_h, out_w, C) for crops (n, 6) = (first pixel, row stride in pixels, y0, h, x0, w) that all
    run in the same pass order."""
    out_w, out_h = size
    origin, row_stride, heights, widths = crops[:, 0], crops[:, 1], crops[:, 3], crops[:, 5]
    if vfirst:  # axis 1 = y, axis 2 = x
        len1, stride1, out1, len2, stride2, out2 = heights, row_stride, out_h, widths, np.ones_like(widths), out_w
    else:
        len1, stride1, out1, len2, stride2, out2 = widths, np.ones_like(widths), out_w, heights, row_stride, out_h
    # first pass: one line per position along axis 2 (Pillow computes only the lines the second pass reads;
    # the others cost time but change nothing)
    owner = np.repeat(np.arange(len(crops)), len2)
    along = np.arange(len(owner)) - np.repeat(np.cumsum(len2) - len2, len2)
    first = _resample(pixels, _Lines(origin[owner] + along * stride2[owner], stride1[owner], len1[owner], out1))
    # second pass: one line per output pixel of the first pass, across that crop's lines
    line0 = np.cumsum(len2) - len2
    owner = np.repeat(np.arange(len(crops)), out1)
    along = np.tile(np.arange(out1), len(crops))
    second = _resample(first.reshape(-1, pixels.shape[1]),
                       _Lines(line0[owner] * out1 + along, np.full(len(owner), out1), len2[owner], out2))
    second = second.reshape(len(crops), out1, out2, -1)
    return second if vfirst else second.transpose(1, 2)


def premultiply(pixels: torch.Tensor) -> torch.Tensor:
    """RGBA -> RGBa / LA -> La as Pillow converts (MULDIV255 of each colour by alpha), alpha last."""
    alpha = pixels[:, -1:].to(torch.int32)
    t = pixels[:, :-1].to(torch.int32) * alpha + 128
    return torch.cat([(((t >> 8) + t) >> 8).to(torch.uint8), pixels[:, -1:]], dim=1)


def unpremultiply(pixels: torch.Tensor) -> torch.Tensor:
    """RGBa -> RGBA / La -> LA as Pillow converts: 255 * colour // alpha, clipped, unless alpha is 0 or 255."""
    alpha = pixels[..., -1:].to(torch.int32)
    colour = pixels[..., :-1].to(torch.int32)
    divided = torch.div(255 * colour, alpha.clamp(min=1), rounding_mode="floor").clamp_(max=255)
    keep = (alpha == 0) | (alpha == 255)
    return torch.cat([torch.where(keep, colour, divided).to(torch.uint8), pixels[..., -1:]], dim=-1)


def resize_windows(pixels: torch.Tensor, width: np.ndarray, windows: np.ndarray,
                   size: Tuple[int, int] = (256, 256)) -> torch.Tensor:
    """`Image.resize(size)` (bicubic, no reducing_gap) of each window, in the images' own mode, on the device of
    `pixels`.

    pixels: (P, C) uint8, images of C channels (1 L, 2 LA, 3 RGB, 4 RGBA) one after another, rows of
    `width` pixels; windows: (n, 5) int64 (first pixel of its image, y0, y1, x0, x1), non-empty, inside the
    image. Returns (n, size[1], size[0], C) uint8."""
    out_w, out_h = size
    channels = pixels.shape[1]
    n = len(windows)
    result = torch.empty((n, out_h, out_w, channels), dtype=torch.uint8, device=pixels.device)
    if n == 0:
        return result
    start, y0, y1, x0, x1 = (windows[:, i] for i in range(5))
    heights, widths = y1 - y0, x1 - x0
    if (heights < 1).any() or (widths < 1).any():
        raise ValueError("resize_windows: every window needs at least one pixel")
    crops = np.stack([start + y0 * width + x0, width, y0, heights, x0, widths], axis=1)
    same = (heights == out_h) & (widths == out_w)  # Image.resize returns a copy: no passes, no premultiplying
    if same.any():
        yy, xx = np.meshgrid(np.arange(out_h), np.arange(out_w), indexing="ij")
        index = crops[same, 0][:, None, None] + yy * width[same][:, None, None] + xx
        result[torch.from_numpy(np.flatnonzero(same)).to(pixels.device)] = pixels[torch.from_numpy(index).to(
            pixels.device)]
    alpha = channels in (2, 4)
    source = premultiply(pixels) if alpha and not same.all() else pixels
    order = np.array([vertical_first(int(h), int(w), out_h, out_w) for h, w in zip(heights, widths)])
    for vfirst in (False, True):
        chosen = np.flatnonzero(~same & (order == vfirst))
        if len(chosen):
            out = _two_passes(source, crops[chosen], size, vfirst)
            result[torch.from_numpy(chosen).to(pixels.device)] = unpremultiply(out) if alpha else out
    return result


def to_rgb(crops: torch.Tensor) -> torch.Tensor:
    """Image.convert('RGB') of (n, h, w, C) uint8 crops: L and LA repeat their grey, RGBA drops alpha."""
    channels = crops.shape[-1]
    return crops[..., :3] if channels >= 3 else crops[..., :1].expand(*crops.shape[:-1], 3)


def crops_rgb(pixels: torch.Tensor, shapes: np.ndarray, windows: np.ndarray, size: int = 256) -> torch.Tensor:
    """The model's uint8 (n, size, size, 3) inputs for numpy-normalized windows (n, 5) = (image, y0, y1, x0,
    x1) of images packed one after another in the flat uint8 `pixels` with `shapes` (images, 3) = (H, W, C):
    each window's pixels resized as `Image.resize((size, size))` then converted to RGB, an empty window
    black, exactly as fathompipe.model.preprocess does on the CPU."""
    device = pixels.device
    result = torch.zeros((len(windows), size, size, 3), dtype=torch.uint8, device=device)
    nbytes = shapes.prod(axis=1)
    offsets = np.cumsum(nbytes) - nbytes
    nonempty = (windows[:, 2] > windows[:, 1]) & (windows[:, 4] > windows[:, 3])
    for channels in np.unique(shapes[:, 2]):
        images = np.flatnonzero(shapes[:, 2] == channels)
        if len(images) == len(shapes):
            buffer, first = pixels, offsets // channels
        else:  # a batch mixing modes (rare): this mode's images copied together
            buffer = torch.cat([pixels[offsets[i]:offsets[i] + nbytes[i]] for i in images])
            first = np.zeros(len(shapes), np.int64)
            first[images] = np.cumsum(nbytes[images]) // channels - nbytes[images] // channels
        rows = np.flatnonzero(nonempty & (shapes[windows[:, 0], 2] == channels))
        if not len(rows):
            continue
        w = windows[rows]
        resized = resize_windows(buffer.view(-1, int(channels)), shapes[w[:, 0], 1],
                                 np.column_stack([first[w[:, 0]], w[:, 1:]]), (size, size))
        result[torch.from_numpy(rows).to(device)] = to_rgb(resized)
    return result


def pack_images(images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, np.ndarray]:
    """Decoded HxWxC uint8 images -> (one flat uint8 tensor, shapes (n, 3)): one buffer, so a DataLoader
    worker hands a batch's images over in a single shared-memory segment."""
    shapes = np.array([im.shape for im in images], dtype=np.int64).reshape(-1, 3)
    flat = torch.empty(int(shapes.prod(axis=1).sum()), dtype=torch.uint8)
    view = flat.numpy()
    at = 0
    for im in images:
        view[at:at + im.size] = im.reshape(-1)
        at += im.size
    return flat, shapes
