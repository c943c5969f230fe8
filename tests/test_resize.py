"""fathompipe.model.resize equals Pillow's Image.resize byte for byte: every mode, random sizes from 1 px to a full
frame, extreme aspect ratios, upscales and downscales, in both exact arithmetics (float64 is what the CPU runs,
float32 digits what a GPU runs), and a batch mixing modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fathompipe.model.resize import (PILLOW, coefficients, crops_rgb, digit_bits, pack_images, premultiply,
                                     resize_windows, unpremultiply, vertical_first)

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
ARITHMETIC = {"float64": torch.float64, "float32-digits": torch.float32}
RANDOM_WINDOWS = {torch.float64: 300, torch.float32: 200}  # a mode: 2,000 in all


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small tensor ops: one thread is 4x faster than two on a shared 2-core runner (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_image(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Noise, with alpha (if any) often 0 or 255, the values Pillow's (un)premultiplication treats apart."""
    image = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if channels in (2, 4):
        alpha = image[..., -1]
        alpha[rng.random(alpha.shape) < 0.2] = 255
        alpha[rng.random(alpha.shape) < 0.1] = 0
    return image


def pillow(crop: np.ndarray, size=(256, 256)) -> np.ndarray:
    channels = crop.shape[2]
    im = Image.fromarray(crop[..., 0] if channels == 1 else crop, MODES[channels])
    return np.asarray(im.resize(size)).reshape(size[1], size[0], channels)


def ours(image: np.ndarray, windows: np.ndarray, exact: torch.dtype, size=(256, 256)) -> np.ndarray:
    """windows: (n, 4) y0, y1, x0, x1 inside `image`."""
    height, width, channels = image.shape
    full = np.column_stack([np.zeros(len(windows), np.int64), windows])
    return resize_windows(torch.from_numpy(image.reshape(-1, channels)), np.full(len(windows), width), full, size,
                          exact).numpy()


def assert_equal(image: np.ndarray, windows: np.ndarray, exact: torch.dtype, size=(256, 256)) -> None:
    got = ours(image, windows, exact, size)
    for (y0, y1, x0, x1), g in zip(windows, got):
        want = pillow(image[y0:y1, x0:x1], size)
        assert np.array_equal(g, want), (f"{MODES[image.shape[2]]} {y1 - y0}x{x1 - x0} -> {size}: "
                                         f"{int((g != want).sum())} bytes differ")


@pytest.mark.parametrize("exact", list(ARITHMETIC.values()), ids=list(ARITHMETIC))
@pytest.mark.parametrize("channels", list(MODES), ids=list(MODES.values()))
def test_random_windows_of_a_full_frame(channels, exact):
    """Windows with sides log-uniform from 1 px to the whole 1920x1080 frame, anywhere in it."""
    rng = np.random.default_rng(channels)
    image = random_image(rng, 1080, 1920, channels)
    n = RANDOM_WINDOWS[exact]
    h = np.clip(np.exp(rng.uniform(0, np.log(1081), n)).astype(np.int64), 1, 1080)
    w = np.clip(np.exp(rng.uniform(0, np.log(1921), n)).astype(np.int64), 1, 1920)
    h[:3], w[:3] = (1080, 1, 1080), (1920, 1920, 1)  # the whole frame, a full row, a full column
    y0 = (rng.random(n) * (1081 - h)).astype(np.int64)
    x0 = (rng.random(n) * (1921 - w)).astype(np.int64)
    assert_equal(image, np.column_stack([y0, y0 + h, x0, x0 + w]), exact)


EXTREMES = [(1, 1), (1, 2), (2, 1), (1, 1920), (1080, 1), (256, 256), (256, 255), (255, 256), (256, 1000),
            (1000, 256), (257, 1), (1, 257), (30000, 3), (3, 30000), (25700, 200), (4000, 30),
            # around Pillow 13's vertical-pass-first rule, h - 256 > 2 * (w - 256)
            (344, 300), (345, 300), (944, 600), (945, 600), (300, 100), (1920, 1080)]


@pytest.mark.parametrize("exact", list(ARITHMETIC.values()), ids=list(ARITHMETIC))
@pytest.mark.parametrize("channels", list(MODES), ids=list(MODES.values()))
def test_extreme_sizes(channels, exact):
    """1 px, single rows and columns, the output size itself (RGBA: no premultiplication then), more than 100x
    taller than wide (and 117x smaller: narrower float32 digits), and both sides of the pass-order rule."""
    rng = np.random.default_rng(10 + channels)
    for height, width in EXTREMES:
        assert_equal(random_image(rng, height, width, channels), np.array([[0, height, 0, width]]), exact)


@pytest.mark.parametrize("size", [(64, 128), (128, 64), (300, 7)])
def test_other_output_sizes(size):
    rng = np.random.default_rng(3)
    for height, width in [(100, 100), (201, 100), (200, 100), (65, 100), (108, 150), (109, 150), (5, 700)]:
        for exact in ARITHMETIC.values():
            assert_equal(random_image(rng, height, width, 3), np.array([[0, height, 0, width]]), exact, size)


def test_pass_order_rule():
    """The rule of the installed Pillow (the exactness tests above are what prove it)."""
    if PILLOW >= (13, 0):
        assert vertical_first(345, 300, 256, 256) and not vertical_first(344, 300, 256, 256)
        assert vertical_first(257, 10, 256, 256) and not vertical_first(256, 10, 256, 256)  # only when h shrinks
    elif PILLOW >= (12, 2):
        assert vertical_first(30000, 3, 256, 256) and not vertical_first(300, 3, 256, 256)
        assert not vertical_first(345, 300, 256, 256) and not vertical_first(200, 1, 256, 256)
    else:
        assert not vertical_first(30000, 3, 256, 256)


def test_premultiplication_equals_pillows_conversions():
    """Every (value, alpha) pair through RGBA -> RGBa -> RGBA and LA -> La -> LA."""
    v, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for mode, premultiplied, planes in [("RGBA", "RGBa", [v, v // 2, 255 - v, a]), ("LA", "La", [v, a])]:
        pixels = np.dstack(planes).astype(np.uint8)
        want = np.asarray(Image.fromarray(pixels, mode).convert(premultiplied))
        got = premultiply(torch.from_numpy(pixels.reshape(-1, len(planes)))).numpy().reshape(pixels.shape)
        assert np.array_equal(got, want)
        back = np.asarray(Image.frombytes(premultiplied, (256, 256), pixels.tobytes()).convert(mode))
        assert np.array_equal(unpremultiply(torch.from_numpy(pixels)).numpy(), back)


def test_weights_fit_pillows_int32_and_the_float32_digits():
    """For input sizes up to 8,000 px (and a 30,000 px strip), Pillow's int32 sums cannot overflow (checked in
    `coefficients` for every table), and the digits of each weight sum to it."""
    from fathompipe.model.resize import banded, block_weights
    for in_size in list(range(1, 8001, 43)) + [255, 256, 257, 1080, 1920, 30000]:
        kk = coefficients(in_size, 256)[1].astype(np.int64)
        assert (255 * np.clip(kk, 0, None).sum(1) + 2**21).max() < 2**31
        bits = digit_bits(kk.shape[1])
        planes = block_weights(in_size, 256, bits).astype(np.int64)
        count = planes.shape[2] // 16
        rebuilt = (planes.reshape(*planes.shape[:2], 16, count) * (1 << (bits * np.arange(count)))).sum(3)
        assert np.array_equal(rebuilt, banded(in_size, 256)[1])


def test_a_batch_mixing_modes_and_empty_windows():
    """crops_rgb over images of several modes packed in one buffer: each window as preprocess would give it
    (Pillow resize, then convert('RGB')), an empty window black."""
    rng = np.random.default_rng(7)
    images = [random_image(rng, 300, 400, 3), random_image(rng, 120, 90, 4), random_image(rng, 500, 40, 2),
              random_image(rng, 64, 64, 3)]
    pixels, shapes = pack_images(images)
    windows = np.array([[0, 0, 300, 0, 400], [1, 10, 100, 5, 80], [2, 0, 500, 3, 40], [0, 50, 50, 0, 10],
                        [3, 0, 64, 0, 64], [1, 0, 120, 0, 90], [2, 7, 300, 0, 1], [0, 299, 300, 399, 400]])
    got = crops_rgb(pixels, shapes, windows).numpy()
    for (i, y0, y1, x0, x1), g in zip(windows, got):
        crop = images[i][y0:y1, x0:x1]
        if crop.size == 0:
            want = np.zeros((256, 256, 3), np.uint8)
        else:
            want = np.asarray(Image.fromarray(crop, MODES[crop.shape[2]]).resize((256, 256)).convert("RGB"))
        assert np.array_equal(g, want), (i, y0, y1, x0, x1)


def test_exact_under_autocast_and_reduced_float32_matmul_precision():
    """Inside the model's autocast, or with float32 products allowed to run in reduced precision (what TF32 is on
    a GPU), the float32 digits stay exact: every pixel and digit fits 8 bits."""
    rng = np.random.default_rng(11)
    image = random_image(rng, 700, 900, 3)
    windows = np.array([[0, 700, 0, 900], [10, 60, 20, 90], [0, 700, 0, 3]])
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert_equal(image, windows, torch.float32)
            assert_equal(image, windows, torch.float64)
    finally:
        torch.set_float32_matmul_precision(before)
