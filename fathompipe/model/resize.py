"""Pillow's bicubic `Image.resize`, bit for bit, as exact integer arithmetic in torch, on any device.

Pillow (src/libImaging/Resample.c, 8 bits per channel) resizes in two separable passes. Per output
pixel it sums `pixel * k` over the filter's taps in 32-bit integers, where `k` is the bicubic weight
(a = -0.5) computed in double precision, normalized by the taps' sum and rounded to 22 fractional
bits; the result is `(2^21 + sum) >> 22` clipped to 0..255, and the first pass's output is rounded
and clipped that way too before the second pass reads it. This module computes the same integers:
- the weights: once per (input size, output size), in float64 exactly as Pillow's C does (cached);
- each pass: for a batch of crops at once, the taps of every tile of TILE outputs are gathered and
  multiplied by a dense (span x TILE) block of integer weights in one batched matrix product. Every
  product and partial sum is an integer that the float type holds exactly, so the order in which BLAS
  adds them does not matter: float64 with whole weights (|sum| < 2^31 < 2^53; on the CPU, where
  float64 is fast), or float32 with the weights split in base-256 digits (each digit sum < 2^24,
  exact in float32 even with TF32 or bfloat16 inputs allowed; on GPUs, whose float64 may be slow),
  recombined in float64. Rounding, clipping and the premultiplication are integer tensor ops.

What `Image.resize(size)` adds around the passes, reproduced here (measured against Pillow 13.0.0,
tests/test_resize.py):
- pass order (`vertical_first`): Pillow >= 13 runs the vertical pass first when the height shrinks by
  more than twice as many pixels as the width (`h > out_h and h - out_h > 2 * (w - out_w)`), 12.2 and
  12.3 when the image is over 100x taller than wide and its height shrinks, earlier versions never;
- RGBA and LA are resized premultiplied (RGBa, La) and un-premultiplied after, with Pillow's integer
  conversions; a crop already of the output size is returned as is (no premultiplication);
- a pass whose input and output sizes are equal is the identity (its only non-zero weight is 2^22).

Overflow: Pillow accumulates in int32 with 2 spare bits. `coefficients` checks for every table that
255 times the sum of its positive (negative) weights plus 2^21 stays inside int32, so Pillow's sums
never overflow and ours, held exactly, equal them.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import PIL
import torch

PRECISION_BITS = 22
HALF = 1 << (PRECISION_BITS - 1)
PILLOW = tuple(int(part) for part in PIL.__version__.split(".")[:2])
# Elements (crops x tiles x rows x channels x span) gathered at once: bounds a pass's temporary memory (an
# index, the gathered bytes and their float copy: about 13-17 bytes an element) whatever the crop sizes.
CHUNK_ELEMENTS = 1 << 25
TILE = 16  # outputs per block of the banded matrix product


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
    """Whether the installed Pillow runs the vertical pass first for this resize (measured on 13.0.0, 12.2.0 and
    11.2.1 by tests/test_resize.py)."""
    if PILLOW >= (13, 0):  # in C (python-pillow/Pillow#9549): the height shrinks by over twice the width's pixels
        return height > out_height and height - out_height > 2 * (width - out_width)
    if PILLOW >= (12, 2):  # in Image.resize (python-pillow/Pillow#9524): over 100x taller than wide, shrinking
        return height > 100 * width and out_height < height
    return False


@functools.lru_cache(maxsize=16384)
def banded(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """`coefficients` as dense blocks for a matrix product: the outputs in tiles of TILE, tile t reading the
    `span` inputs from first[t]. Returns first (tiles,) int64 and weights (tiles, span, TILE) int64, zero where an
    output has no tap. A tile's span is about (TILE + 4) * scale taps, so a 1920-pixel row costs 8x less than
    a dense (1920 x 256) product."""
    start, kk = coefficients(in_size, out_size)
    ksize = kk.shape[1]
    tiles = -(-out_size // TILE)
    outputs = np.minimum(np.arange(tiles * TILE), out_size - 1).reshape(tiles, TILE)  # last tile padded
    first = start[outputs[:, 0]]
    span = int((start[outputs] + ksize - first[:, None]).max())
    offset = first[:, None, None] + np.arange(span)[None, :, None] - start[outputs][:, None, :]  # (tiles, span, TILE)
    inside = (offset >= 0) & (offset < ksize)
    return first, np.where(inside, kk[outputs[:, None, :], np.clip(offset, 0, ksize - 1)], 0).astype(np.int64)


def digit_bits(ksize: int) -> int:
    """Bits per float32 digit (at most 8) such that a pixel times a digit, summed over ksize taps, stays below
    2^24."""
    bits = 8
    while 255 * ((1 << bits) - 1) * ksize >= 1 << 24:
        bits -= 1
    return bits


@functools.lru_cache(maxsize=16384)
def block_weights(in_size: int, out_size: int, bits: int) -> np.ndarray:
    """`banded`'s weights for the matrix product: bits == 0, whole weights as float64 (tiles, span, TILE); else
    split into base-2^bits digits, the top one signed, as float32 (tiles, span, TILE * digits), digit d of
    output j in column j * digits + d."""
    weights = banded(in_size, out_size)[1]
    if bits == 0:
        return weights.astype(np.float64)
    count = -(-(PRECISION_BITS + 2) // bits)
    planes = [(weights >> (bits * d)) & ((1 << bits) - 1) for d in range(count - 1)]
    stacked = np.stack(planes + [weights >> (bits * (count - 1))], axis=3)  # (tiles, span, TILE, count)
    return stacked.reshape(*weights.shape[:2], -1).astype(np.float32)


def default_float(device: torch.device) -> torch.dtype:
    """float64 where it is fast (the CPU), float32 digits on accelerators (consumer GPUs run float64 at 1/64)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _bucket(n: np.ndarray) -> np.ndarray:
    """Sizes rounded up to a power of two: the crops of a bucket share each matrix product, padded to its largest
    (less than 2x along each side), so a batch of a few hundred crops takes a few tens of products, not one each."""
    return 1 << np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64)


def _pass(source: torch.Tensor, origin: np.ndarray, channel_stride: np.ndarray, length: np.ndarray,
          stride: np.ndarray, rows: int, row_length: np.ndarray, row_stride: np.ndarray, out: int,
          channels: int, exact: torch.dtype) -> torch.Tensor:
    """One of Pillow's passes over n 2-D crops of the flat uint8 `source`: crop i's element (row r, channel c,
    position p) is at origin + r * row_stride + c * channel_stride + p * stride; each row's `length` positions are
    resized to `out`. Rows at or past row_length repeat the last row (padding to `rows`). Returns (n, rows, C, out)
    uint8, rounded and clipped like Pillow's intermediate image."""
    device, n = source.device, len(length)
    sizes, table = np.unique(length, return_inverse=True)
    bits = 0 if exact == torch.float64 else digit_bits(max(coefficients(int(s), out)[1].shape[1] for s in sizes))
    count = 1 if bits == 0 else -(-(PRECISION_BITS + 2) // bits)
    bands = [banded(int(s), out)[0] for s in sizes]
    blocks = [block_weights(int(s), out, bits) for s in sizes]
    span, tiles = max(b.shape[1] for b in blocks), len(bands[0])
    weights = torch.from_numpy(np.stack([np.pad(b, ((0, 0), (0, span - b.shape[1]), (0, 0))) for b in blocks])
                               ).to(device)[torch.from_numpy(table).to(device)]  # (n, tiles, span, TILE * count)
    first = np.stack(bands)[table]  # (n, tiles)
    position = np.minimum(first[:, :, None] + np.arange(span), length[:, None, None] - 1) * stride[:, None, None]
    row = np.minimum(np.arange(rows)[None, :], row_length[:, None] - 1) * row_stride[:, None]  # (n, rows)
    row_channel = origin[:, None, None] + row[:, :, None] + np.arange(channels) * channel_stride[:, None, None]
    # the full index (n, tiles, rows, C, span) is made on the device from its two small factors
    kind = torch.int32 if source.numel() < 2**31 else torch.int64  # a smaller index gathers faster
    index = (torch.from_numpy(row_channel).to(device, kind)[:, None, :, :, None]
             + torch.from_numpy(position).to(device, kind)[:, :, None, None, :])
    gathered = source.index_select(0, index.view(-1)).view(n * tiles, rows * channels, span).to(exact)
    if count == 1:  # Pillow's int32 sum plus its rounding half, exact in float64
        total = torch.baddbmm(torch.tensor(float(HALF), dtype=exact, device=device), gathered,
                              weights.view(n * tiles, span, TILE))
    else:  # recombine the digits' exact sums into Pillow's int32 sum, exactly (< 2^53)
        sums = torch.bmm(gathered, weights.view(n * tiles, span, TILE * count)).view(n * tiles, rows * channels,
                                                                                      TILE, count)
        total = sums[..., 0].double().add_(HALF)
        for d in range(1, count):
            total.add_(sums[..., d], alpha=float(1 << (bits * d)))
    # Pillow's clip8((sum + 2^21) >> 22): clipped first, the exact power-of-two scaling truncates to the same byte
    pixels = total.clamp_(0, (256 << PRECISION_BITS) - 1).mul_(1.0 / (1 << PRECISION_BITS)).to(torch.uint8)
    return pixels.view(n, tiles, rows, channels, TILE).permute(0, 2, 3, 1, 4).reshape(n, rows, channels, -1)[..., :out]


def _two_passes(source: torch.Tensor, crops: np.ndarray, size: Tuple[int, int], vfirst: bool,
                exact: torch.dtype) -> torch.Tensor:
    """(n, out_h, out_w, C) for crops (n, 5) = (first element, row stride in elements, h, w, C) that share a pass
    order and a bucket: the first pass along x (y if vfirst) for every row (column), then the second pass."""
    out_w, out_h = size
    origin, row_stride, heights, widths = crops[:, 0], crops[:, 1], crops[:, 2], crops[:, 3]
    channels = int(crops[0, 4])
    one, pixel = np.ones_like(origin), np.full_like(origin, channels)
    if vfirst:  # resize columns (stride: a row), one per x; then along x
        len1, stride1, out1, len2, stride2, out2 = heights, row_stride, out_h, widths, pixel, out_w
    else:
        len1, stride1, out1, len2, stride2, out2 = widths, pixel, out_w, heights, row_stride, out_h
    rows = int(len2.max())
    first = _pass(source, origin, one, len1, stride1, rows, len2, stride2, out1, channels, exact)  # (n, rows, C, out1)
    n = len(crops)
    block = rows * channels * out1
    # second pass: the first pass's output positions are the rows now, its rows the positions resized
    second = _pass(first.reshape(-1), np.arange(n) * block, np.full(n, out1), len2, np.full(n, channels * out1),
                   out1, np.full(n, out1), one, out2, channels, exact)  # (n, out1, C, out2)
    return second.permute(0, 1, 3, 2) if vfirst else second.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=8)
def _alpha_tables(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pillow's conversions for every (alpha, colour) byte pair, at alpha * 256 + colour: RGBA -> RGBa (MULDIV255
    of the colour by alpha) and RGBa -> RGBA (255 * colour // alpha clipped, the colour itself at alpha 0 and 255)."""
    alpha, colour = torch.arange(256).repeat_interleave(256), torch.arange(256).repeat(256)
    t = colour * alpha + 128
    multiplied = ((t >> 8) + t) >> 8
    divided = torch.where((alpha == 0) | (alpha == 255), colour,
                          torch.div(255 * colour, alpha.clamp(min=1), rounding_mode="floor").clamp(max=255))
    return multiplied.to(torch.uint8).to(device), divided.to(torch.uint8).to(device)


def _by_alpha(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    colour = table[pixels[..., -1:].to(torch.int32) * 256 + pixels[..., :-1]]
    return torch.cat([colour, pixels[..., -1:]], dim=-1)


def premultiply(pixels: torch.Tensor) -> torch.Tensor:
    """RGBA -> RGBa / LA -> La (alpha last) exactly as Pillow converts."""
    return _by_alpha(pixels, _alpha_tables(pixels.device)[0])


def unpremultiply(pixels: torch.Tensor) -> torch.Tensor:
    """RGBa -> RGBA / La -> LA (alpha last) exactly as Pillow converts."""
    return _by_alpha(pixels, _alpha_tables(pixels.device)[1])


def resize_windows(pixels: torch.Tensor, width: np.ndarray, windows: np.ndarray,
                   size: Tuple[int, int] = (256, 256), exact: Optional[torch.dtype] = None) -> torch.Tensor:
    """`Image.resize(size)` (bicubic, no reducing_gap) of each window, in the images' own mode, on the device of
    `pixels`.

    pixels: (P, C) uint8, images of C channels (1 L, 2 LA, 3 RGB, 4 RGBA) one after another; width: (n,) the
    width of each window's image; windows: (n, 5) int64 (first pixel of its image, y0, y1, x0, x1), non-empty,
    inside the image. exact: the float type of the matrix products (default_float: both give the same bytes).
    Returns (n, size[1], size[0], C) uint8."""
    out_w, out_h = size
    exact = exact or default_float(pixels.device)
    device, channels, n = pixels.device, pixels.shape[1], len(windows)
    result = torch.empty((n, out_h, out_w, channels), dtype=torch.uint8, device=device)
    if n == 0:
        return result
    start, y0, y1, x0, x1 = (windows[:, i] for i in range(5))
    heights, widths = y1 - y0, x1 - x0
    if (heights < 1).any() or (widths < 1).any():
        raise ValueError("resize_windows: every window needs at least one pixel")
    first = start + y0 * width + x0
    same = (heights == out_h) & (widths == out_w)  # Image.resize returns a copy: no passes, no premultiplying
    if same.any():
        yy, xx = np.meshgrid(np.arange(out_h), np.arange(out_w), indexing="ij")
        index = first[same][:, None, None] + yy * width[same][:, None, None] + xx
        result[torch.from_numpy(np.flatnonzero(same)).to(device)] = pixels[torch.from_numpy(index).to(device)]
    alpha = channels in (2, 4)
    source = (premultiply(pixels) if alpha and not same.all() else pixels).reshape(-1)
    crops = np.stack([first * channels, width * channels, heights, widths, np.full(n, channels)], axis=1)
    vfirst = np.array([vertical_first(int(h), int(w), out_h, out_w) for h, w in zip(heights, widths)], dtype=bool)
    len1, len2 = np.where(vfirst, heights, widths), np.where(vfirst, widths, heights)
    # crops of one pass order and similar sizes share each matrix product, in chunks of bounded memory
    keys = np.stack([vfirst, _bucket(len2), _bucket(len1)], axis=1)[~same]
    todo = np.flatnonzero(~same)
    with torch.autocast(device.type, enabled=False):  # an enclosing autocast would run the products in 16 bits
        for key in np.unique(keys, axis=0):
            _resize_group(source, crops, todo[(keys == key).all(axis=1)], bool(key[0]), len1, len2, size, exact,
                          alpha, result)
    return result


def _resize_group(source: torch.Tensor, crops: np.ndarray, members: np.ndarray, vfirst: bool, len1: np.ndarray,
                  len2: np.ndarray, size: Tuple[int, int], exact: torch.dtype, alpha: bool,
                  result: torch.Tensor) -> None:
    """The crops of one pass order and bucket into `result`, in chunks of at most about CHUNK_ELEMENTS gathered."""
    out1, out2 = (size[1], size[0]) if vfirst else size
    longest1, longest2 = int(len1[members].max()), int(len2[members].max())
    per_crop = int(crops[0, 4]) * max(-(-out1 // TILE) * longest2 * banded(longest1, out1)[1].shape[1],  # first pass
                                      -(-out2 // TILE) * out1 * banded(longest2, out2)[1].shape[1])  # second pass
    step = max(1, CHUNK_ELEMENTS // per_crop)
    for lo in range(0, len(members), step):
        chosen = members[lo:lo + step]
        out = _two_passes(source, crops[chosen], size, vfirst, exact)
        result[torch.from_numpy(chosen).to(result.device)] = unpremultiply(out) if alpha else out


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


def pack_images(images: Sequence[np.ndarray], shared: bool = False) -> Tuple[torch.Tensor, np.ndarray]:
    """Decoded HxWxC uint8 images -> (one flat uint8 tensor, shapes (n, 3)): one buffer, so a DataLoader worker
    hands a batch's images over as a single shared-memory segment. shared: allocate it in shared memory (in a
    DataLoader worker), so that handing it over copies nothing more."""
    shapes = np.array([im.shape for im in images], dtype=np.int64).reshape(-1, 3)
    nbytes = int(shapes.prod(axis=1).sum())
    # private (torch 2.13): a storage born in shared memory; share_memory_() would copy the buffer there
    flat = (torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes)) if shared
            else torch.empty(nbytes, dtype=torch.uint8))
    view = flat.numpy()
    at = 0
    for im in images:
        view[at:at + im.size] = im.reshape(-1)
        at += im.size
    return flat, shapes
