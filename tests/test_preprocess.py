"""Preprocessing equals the reference recipe, image mode by image mode and box by box."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from conftest import PARITY
from fathompipe.model.preprocess import crop_image, decode, normalization_lut, normalize_uint8, plan_crops
from fathompipe.model.resize import crops_rgb, pack_images
from support.reference_recipe import reference_roi

PILLOW13 = int(PIL.__version__.split(".")[0]) >= 13
LUT = normalization_lut()
SOURCE = PARITY / "images" / "f149f542-e935-4870-9734-6b4501eaf614.png"  # 720x486 RGB
BOXES = {
    "inside": [100.5, 80.25, 41.0, 33.0],
    "partly outside, top left": [-30.5, -12.0, 41.0, 60.0],
    "partly outside, bottom right": [700.0, 470.0, 60.0, 40.0],
    "wholly right of the image": [900.0, 100.0, 30.0, 30.0],
    "wholly below the image": [100.0, 700.0, 30.0, 30.0],
    "far above and left (negative slice ends)": [-2000.0, -1500.0, 50.0, 50.0],
    "tiny (max side < 2)": [50.0, 50.0, 1.5, 1.0],
    "centre beyond the longer side": [1500.0, 200.0, 20.0, 20.0],
}


def ours(path: Path, bbox) -> list:
    c = crop_image(path, [bbox])
    arrays = [c.obj, c.env[3], c.env[5], c.env[-1][c.whole_index]]
    return [normalize_uint8(torch.from_numpy(a), LUT)[0].numpy() for a in arrays], c.notes[0], c.image_note


def png_48bit(arr16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def mode_images(tmp_path_factory) -> dict:
    """The same picture in every mode the reference accepts, plus the ones it crashes on."""
    d = tmp_path_factory.mktemp("modes")
    rgb = Image.open(SOURCE).convert("RGB")
    arr = np.asarray(rgb)
    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, arr.shape[:2], dtype=np.uint8)
    made = {}

    def save(name: str, im: Image.Image, fmt: str = "PNG") -> None:
        im.save(d / f"{name}.png", format=fmt)
        made[name] = d / f"{name}.png"

    save("RGB", rgb)
    save("RGBA", Image.fromarray(np.dstack([arr, alpha]), "RGBA"))
    save("LA", Image.fromarray(np.dstack([arr[..., 0], alpha]), "LA"))
    save("L", rgb.convert("L"))
    save("JPEG-in-PNG", rgb, fmt="JPEG")
    (d / "RGB48.png").write_bytes(png_48bit(arr.astype(np.uint16) * 257 + rng.integers(0, 200, arr.shape)))
    made["RGB48"] = d / "RGB48.png"
    save("P", rgb.convert("P"))
    save("I16", Image.fromarray(arr[..., 1].astype(np.uint16) * 256))  # mode I;16
    save("1", rgb.convert("1"))
    save("CMYK-JPEG", rgb.convert("CMYK"), fmt="JPEG")
    return made


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "JPEG-in-PNG", "RGB48"])
@pytest.mark.parametrize("box", list(BOXES))
def test_equals_reference_for_modes_it_accepts(mode_images, mode, box):
    path = mode_images[mode]
    got, note, image_note = ours(path, BOXES[box])
    want = reference_roi(path, BOXES[box])
    for name, g, w in zip(["obj", "env3", "env5", "env-1"], got, want):
        assert np.array_equal(g, w), f"{mode}, {box}: {name} differs by {np.abs(g - w).max()}"
    assert image_note == ""
    if "wholly" in box or "far above" in box or "tiny" in box or "beyond" in box:
        assert note, "a degenerate crop must be reported"
    if box == "inside":
        assert note == ""


@pytest.mark.parametrize("mode, converted", [("P", "RGB"), ("I16", "RGB"), ("1", "RGB"), ("CMYK-JPEG", "RGB")])
def test_modes_the_reference_crashes_on_are_converted(mode_images, tmp_path, mode, converted):
    path = mode_images[mode]
    with Image.open(path) as im:
        if mode == "I16":  # the documented conversion: high byte, as Pillow does for 48-bit RGB
            as_rgb = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
        else:
            as_rgb = im.convert(converted)
    as_rgb.save(tmp_path / "converted.png")
    got, note, image_note = ours(path, BOXES["inside"])
    want = reference_roi(tmp_path / "converted.png", BOXES["inside"])
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert image_note.endswith("-> RGB")


@pytest.mark.parametrize("ann_id", [1, 16, 30])
def test_model_inputs_equal_the_winners(ann_id):
    import json
    data = json.loads((PARITY / "dataset.json").read_text())
    ann = next(a for a in data["annotations"] if a["id"] == ann_id)
    image = next(i for i in data["images"] if i["id"] == ann["image_id"])
    got, _, _ = ours(PARITY / "images" / image["file_name"], ann["bbox"])
    for name, g in zip(["obj", "env_3", "env_5", "env_-1"], got):
        want = np.load(PARITY / "preprocessed" / f"ann{ann_id}_{name}.npy")  # made with Pillow 11.2.1
        if PILLOW13:  # Pillow 13 may differ by up to 3 levels on tall crops (shared notes, A.7)
            assert np.abs(g - want).max() <= 3 / 255 / 0.224 + 1e-6
        else:
            assert np.array_equal(g, want), name


def device_path(path: Path, bboxes) -> tuple:
    """infer.resize=device: decode only, then the windows cut and resized by fathompipe.model.resize (here on the
    CPU; the same integer arithmetic runs on a GPU, tests/test_resize.py)."""
    arr, image_note = decode(path)
    plan = plan_crops(arr.shape[0], arr.shape[1], bboxes)
    pixels, shapes = pack_images([arr])
    windows = np.column_stack([np.zeros(len(plan.windows), np.int64), np.asarray(plan.windows).reshape(-1, 4)])
    crops = crops_rgb(pixels, shapes, windows).numpy()
    return ([crops[plan.obj], crops[plan.env3], crops[plan.env5], crops[plan.whole][plan.whole_index]],
            plan.notes, image_note)


def cpu_path(path: Path, bboxes) -> tuple:
    c = crop_image(path, bboxes)
    return [c.obj, c.env[3], c.env[5], c.env[-1][c.whole_index]], c.notes, c.image_note


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "JPEG-in-PNG", "RGB48", "P", "I16", "1", "CMYK-JPEG"])
def test_device_path_gives_the_cpu_paths_bytes(mode_images, mode):
    """Every mode, every odd box (empty, negative slice ends, tiny, beyond the image), all at once as one image's
    ROIs: the same uint8 crops, notes and image note, byte for byte."""
    path = mode_images[mode]
    bboxes = list(BOXES.values())
    got, want = device_path(path, bboxes), cpu_path(path, bboxes)
    for name, g, w in zip(["obj", "env3", "env5", "env-1"], got[0], want[0]):
        assert g.shape == w.shape and np.array_equal(g, w), f"{mode}: {name}: {int((g != w).sum())} bytes differ"
    assert got[1:] == want[1:]


def test_device_path_on_the_fixtures_images():
    """The parity fixture's 12 images (1920x1080 down to 333x517, grey, boxes on borders, a 5x7 box) and 30 ROIs."""
    import json
    data = json.loads((PARITY / "dataset.json").read_text())
    for image in data["images"]:
        bboxes = [a["bbox"] for a in data["annotations"] if a["image_id"] == image["id"]]
        got, want = device_path(PARITY / "images" / image["file_name"], bboxes), \
            cpu_path(PARITY / "images" / image["file_name"], bboxes)
        assert all(np.array_equal(g, w) for g, w in zip(got[0], want[0])), image["file_name"]
        assert got[1:] == want[1:]
