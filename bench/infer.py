"""Inference benchmark: preprocessing per core, worker CPU per ROI for both resize paths, model throughput per
precision, the device resize alone, and end to end.

    python bench/infer.py [--sections preprocess,worker,resize,model,parity,e2e] [--device auto] [--quick]

(a) preprocess: ROI/s on one core, fathompipe (decode each image once, shared whole-image crop,
    LUT normalization) against a straightforward per-ROI implementation of the reference recipe
    (reopen and decode the image for every ROI, four crops, resize, float64 rescale, float32
    normalize: what C1.TestModel.py's dataset does), on synthetic 1920x1080 PNGs with the train
    split's ROIs-per-image distribution. The headline compares equal work (normalization included);
    every ROI's four inputs are compared bit for bit.
(b) worker: the CPU time one DataLoader worker process spends per ROI (read from /proc when it has produced
    every batch: decoding, cropping and resizing for infer.resize=cpu, decoding only for device, and handing
    each batch to the main process through shared memory), both paths over the same batches, side by side.
(c) resize: the device resize alone (fathompipe.model.resize on --device) per train-like batch, and that its
    crops equal the cpu path's.
(d) model: ROI/s for fp32, tf32, fp16 and bf16 on the device, argmax agreement with fp32, peak
    memory. The real 16 GB checkpoint is not available here, so the full-size architecture
    (4 x ViT-L/14) gets random weights, and agreement is also measured on the parity fixture's
    trained tiny model.
(e) e2e: `fathompipe.infer.run` over a train-like split (synthetic images, random full-size weights)
    with DataLoader workers: the stage's real ROI/s including decode and preprocessing, for each
    --workers count and --resize path.
Prints one table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # support/

from fathompipe.model.winner import FathomNetClassifier, ModelSpec, to_checkpoint_name  # noqa: E402
from fathompipe.model.preprocess import MEAN, RESCALE, STD, crop_image, normalization_lut, normalize_uint8  # noqa: E402
from support.reference_recipe import reference_roi  # noqa: E402

LABELS = ROOT / "fathompipe/data/train_annotation_labels.csv"
PARITY = ROOT / "tests/fixtures/parity-golden"
rows: List[Dict[str, str]] = []


def report(section: str, variant: str, **values: object) -> None:
    rows.append({"section": section, "variant": variant, **{k: str(v) for k, v in values.items()}})
    print(f"[{section}] {variant}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def rois_per_image(n_images: int, seed: int = 0) -> List[int]:
    """Sample the real train split's ROIs-per-image distribution (from the labels CSV)."""
    counts: Dict[str, int] = {}
    for line in LABELS.read_text().splitlines()[1:]:
        image_id = line.split(",")[1]
        counts[image_id] = counts.get(image_id, 0) + 1
    return np.random.default_rng(seed).choice(np.array(list(counts.values())), n_images).tolist()


def _make_image(args: tuple) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(34, 60, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(small).resize((1920, 1080), Image.BICUBIC)).astype(np.int16)
    im = (im + rng.normal(0, 6, im.shape)).clip(0, 255).astype(np.uint8)  # sensor-like noise: ~3 MB PNGs
    Image.fromarray(im).save(path, compress_level=6)


def repeat_split(ann_path: Path, folder: Path, repeat: int) -> Path:
    """The same split `repeat` times over (new image ids named {id}.png, linked to the same files):
    a longer run from the same pixels, so start-up does not dominate the rate."""
    data = json.loads(ann_path.read_text())
    images, anns = [], []
    for r in range(repeat):
        for im in data["images"]:
            new_id = r * len(data["images"]) + im["id"]
            link = folder / f"{new_id}.png"
            if not link.exists():
                link.symlink_to(im["file_name"])
            images.append({**im, "id": new_id, "file_name": f"{new_id}.png"})
        anns += [{**a, "id": r * len(data["annotations"]) + a["id"],
                  "image_id": r * len(data["images"]) + a["image_id"]} for a in data["annotations"]]
    path = folder / f"annotations-x{repeat}.json"
    path.write_text(json.dumps({**data, "images": images, "annotations": anns}))
    return path


def make_split(folder: Path, n_images: int) -> Path:
    """Synthetic 1920x1080 PNGs and a COCO file with train-like ROI counts and box sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = rois_per_image(n_images)
    rng = np.random.default_rng(1)
    images, anns = [], []
    for i, k in enumerate(counts, start=1):
        name = f"img{i:05d}.png"
        images.append({"id": i, "file_name": name, "width": 1920, "height": 1080,
                       "coco_url": f"http://127.0.0.1/{name}"})
        for _ in range(k):
            # box sizes: a lognormal fitted to the real test split's max(w, h) (median 61 px, p90 196 px)
            side = float(np.clip(rng.lognormal(np.log(61), 0.91), 4, 1000))
            aspect = float(np.exp(rng.normal(0, 0.4)))
            w, h = round(side * min(1, aspect), 1), round(side * min(1, 1 / aspect), 1)
            x, y = float(rng.integers(0, 1920 - int(w))), float(rng.integers(0, 1080 - int(h)))
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": [x, y, w, h], "category_id": None})
    todo = [(folder / im["file_name"], im["id"]) for im in images if not (folder / im["file_name"]).exists()]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_make_image, todo, chunksize=8))
    cats = [{"id": i, "name": f"class{i}"} for i in range(1, 80)]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


_PROCESSOR = None


def processor():
    """transformers' PIL-backend BitImageProcessor with dinov2-large's settings, center crop off:
    the reference's processor (its slow class in transformers 4.52)."""
    global _PROCESSOR
    if _PROCESSOR is None:
        try:
            from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil as Proc
        except ImportError:  # transformers 4.x
            from transformers import BitImageProcessor as Proc
        _PROCESSOR = Proc(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=False,
                          do_rescale=True, rescale_factor=RESCALE, do_normalize=True, image_mean=list(MEAN),
                          image_std=list(STD), do_convert_rgb=True)
    return _PROCESSOR


def transformers_processor(im: Image.Image) -> np.ndarray:
    return processor()(im, return_tensors="np")["pixel_values"][0]


def bench_preprocess(folder: Path, ann_path: Path, n_images: int) -> None:
    torch.set_num_threads(1)
    data = json.loads(ann_path.read_text())
    by_image: Dict[int, List[List[float]]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    images = [im for im in data["images"]][:n_images]
    n_rois = sum(len(by_image.get(im["id"], [])) for im in images)
    lut = normalization_lut()
    processor()

    def ours_worker() -> list:
        return [crop_image(folder / im["file_name"], by_image[im["id"]]) for im in images]

    def ours_normalize(crops: list) -> list:
        """The float32 model inputs, as the GPU step computes them: [obj, env3, env5, whole] per image."""
        return [[normalize_uint8(torch.from_numpy(a), lut) for a in (c.obj, c.env[3], c.env[5], c.env[-1])]
                for c in crops]

    def reference() -> list:
        return [reference_roi(folder / im["file_name"], bbox, transformers_processor)
                for im in images for bbox in by_image[im["id"]]]

    # best of 3, interleaved, so a busy moment on the machine does not decide the ratio
    t_worker, t_norm, t_ref = [], [], []
    for _ in range(3):
        t0 = time.perf_counter()
        crops = ours_worker()
        t_worker.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        inputs = ours_normalize(crops)
        t_norm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref_out = reference()
        t_ref.append(time.perf_counter() - t0)
    ours = n_rois / (min(t_worker) + min(t_norm))  # equal work: the reference normalizes too
    worker = n_rois / min(t_worker)  # what a DataLoader worker does when normalization runs on the GPU
    ref = n_rois / min(t_ref)
    # every ROI of the run, all four inputs, bit for bit
    ours_rois = [[obj[i].numpy(), env3[i].numpy(), env5[i].numpy(), whole[c.whole_index[i]].numpy()]
                 for c, (obj, env3, env5, whole) in zip(crops, inputs) for i in range(len(c.whole_index))]
    same = sum(1 for a, b in zip(ours_rois, ref_out) if all(np.array_equal(x, y) for x, y in zip(a, b)))
    identical = f"{same}/{n_rois} ROIs" + ("" if len(ours_rois) == len(ref_out) == n_rois else " (count mismatch)")
    report("preprocess", "reference per-ROI, normalized (1 core)", roi_per_s=f"{ref:.1f}", rois=n_rois)
    report("preprocess", "fathompipe, normalized on the CPU: equal work (1 core)", roi_per_s=f"{ours:.1f}",
           rois=n_rois, speedup=f"{ours / ref:.2f}x", identical_tensors=identical)
    report("preprocess", "fathompipe worker, uint8 out, normalization left to the GPU (1 core)",
           roi_per_s=f"{worker:.1f}", rois=n_rois, speedup=f"{worker / ref:.2f}x")


def train_like_plan(ann_path: Path, n_images: int, batch_size: int = 64) -> list:
    from fathompipe.annotations import load_coco
    from fathompipe.infer import plan_batches
    dataset = load_coco(ann_path)
    return plan_batches(dataset, dataset.shard(0, 1)[:n_images], batch_size)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _record_pid(folder: str, worker_id: int) -> None:
    (Path(folder) / f"worker-{os.getpid()}.pid").touch()


def worker_cpu(plan: list, folder: Path, resize: str) -> float:
    """CPU seconds of one DataLoader worker process that produced every batch of `plan`, read while it still lives
    (it has decoded, cut or not, and handed over every batch: pickling into shared memory included)."""
    import functools
    from torch.utils.data import DataLoader
    from fathompipe.infer import BatchDataset
    pids = Path(tempfile.mkdtemp())
    loader = DataLoader(BatchDataset(plan, folder, "file_name", resize), batch_size=None, num_workers=1,
                        prefetch_factor=2, worker_init_fn=functools.partial(_record_pid, str(pids)))
    batches = iter(loader)
    for _ in range(len(plan)):
        next(batches)
    seconds = sum(_cpu_seconds(int(p.name[7:-4])) for p in pids.glob("worker-*.pid"))
    del batches  # the worker exits
    shutil.rmtree(pids)
    return seconds


def bench_worker(folder: Path, ann_path: Path, n_images: int) -> None:
    plan = train_like_plan(ann_path, n_images)
    rois = sum(len(item.annotations) for batch in plan for item in batch)
    best: Dict[str, float] = {}
    for _ in range(3):  # interleaved, best of 3: a busy moment on the machine does not decide the ratio
        for resize in ("cpu", "device"):
            best[resize] = min(best.get(resize, float("inf")), worker_cpu(plan, folder, resize))
    what = {"cpu": "decode, crop, resize (Pillow)", "device": "decode only"}
    for resize in ("cpu", "device"):
        report("worker", f"infer.resize={resize}: {what[resize]}, CPU per ROI in one DataLoader worker",
               cpu_ms_per_roi=f"{best[resize] / rois * 1000:.2f}", rois=rois,
               **({"vs_cpu_path": f"{best['cpu'] / best[resize]:.1f}x lower"} if resize == "device" else {}))


def bench_resize(device: torch.device, folder: Path, ann_path: Path, n_images: int) -> None:
    """The device resize alone over train-like batches (the main process's share of infer.resize=device)."""
    from fathompipe.infer import BatchDataset, batch_crops
    plan = train_like_plan(ann_path, n_images)
    device_batches = BatchDataset(plan, folder, "file_name", "device")
    cpu_batches = BatchDataset(plan, folder, "file_name", "cpu")
    batches = [device_batches[i] for i in range(len(plan))]
    if device.type == "cuda":
        batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    batch_crops(batches[0], device)  # warm-up: coefficient tables, kernels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    crops = [batch_crops(b, device) for b in batches]
    sync()
    seconds = time.perf_counter() - t0
    rois = sum(len(b["annotation_id"]) for b in batches)
    same = sum(all(torch.equal(c[k].cpu(), cpu_batches[i][k]) for k in c) for i, c in enumerate(crops))
    report("resize", f"device resize alone on {device.type}, batches of 64 ROIs (pixels already in host memory)",
           roi_per_s=f"{rois / seconds:.1f}", ms_per_batch=f"{seconds / len(batches) * 1000:.1f}", rois=rois,
           identical_tensors=f"{same}/{len(batches)} batches")


def full_spec() -> ModelSpec:
    return ModelSpec(hidden_size=1024, num_layers=24, num_heads=16, patch_size=14, image_size=518, mlp_ratio=4,
                     crop_size=256, scales=[3, 5, -1], attn_blocks=4, attn_heads=8,
                     class_names=[f"class{i}" for i in range(79)])


def random_model(spec: ModelSpec, device: torch.device) -> FathomNetClassifier:
    """Full-size architecture, random weights (DINOv2-like scales), built directly on the device."""
    with torch.device("meta"):
        model = FathomNetClassifier(spec)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name or "layernorm" in name or name.endswith(".net.2.weight") or name.endswith(
                    ".net.6.weight") or name.endswith(".net.3.weight"):
                p.fill_(1.0)
            elif "lambda1" in name:
                p.fill_(0.1)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.eval()


def bench_model(device: torch.device, quick: bool) -> None:
    from fathompipe.infer import Predictor
    spec = tiny_spec() if quick else full_spec()
    model = random_model(spec, device)
    batch_size = 64 if not quick else 4
    n_batches = 8 if not quick else 2
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        u = max(1, round(batch_size / 2.64))
        batches.append({"obj": torch.randint(0, 256, (batch_size, 256, 256, 3), dtype=torch.uint8, generator=g),
                        "env3": torch.randint(0, 256, (batch_size, 256, 256, 3), dtype=torch.uint8, generator=g),
                        "env5": torch.randint(0, 256, (batch_size, 256, 256, 3), dtype=torch.uint8, generator=g),
                        "whole": torch.randint(0, 256, (u, 256, 256, 3), dtype=torch.uint8, generator=g),
                        "whole_index": torch.arange(batch_size) % u})
    if device.type == "cuda":
        for b in batches:
            for k, v in b.items():
                b[k] = v.pin_memory()
    reference = None
    precisions = ["fp32", "tf32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    for precision in precisions:
        pred = Predictor(model, device, precision)
        pred(batches[0])  # warm-up: kernels, autotuning
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        logits = torch.cat([pred(b) for b in batches])
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        if reference is None:
            reference = logits
        agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
        report("model", f"{precision} random full-size" if not quick else f"{precision} quick", batch=batch_size,
               roi_per_s=f"{len(logits) / dt:.1f}", argmax_agree_vs_fp32=f"{agree:.4f}",
               max_abs_logit_diff=f"{(logits - reference).abs().max().item():.4f}", peak_gib=f"{peak:.1f}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_parity_agreement(device: torch.device) -> None:
    """Agreement with fp32 on the parity fixture's trained tiny model (real preprocessing)."""
    from fathompipe.model.weights import export_slim, load_model
    from fathompipe.infer import Predictor
    tmp = Path(tempfile.mkdtemp())
    (tmp / "model.ckpt").write_bytes((PARITY / "model.ckpt").read_bytes())
    slim = export_slim(tmp / "model.ckpt", PARITY / "tiny_dinov2_config.json")
    data = json.loads((PARITY / "dataset.json").read_text())
    names = {im["id"]: im["file_name"] for im in data["images"]}
    crops = [crop_image(PARITY / "images" / names[a["image_id"]], [a["bbox"]]) for a in data["annotations"]]
    batch = {"obj": torch.from_numpy(np.concatenate([c.obj for c in crops])),
             "env3": torch.from_numpy(np.concatenate([c.env[3] for c in crops])),
             "env5": torch.from_numpy(np.concatenate([c.env[5] for c in crops])),
             "whole": torch.from_numpy(np.concatenate([c.env[-1] for c in crops])),
             "whole_index": torch.arange(len(crops))}
    import PIL
    pillow13 = int(PIL.__version__.split(".")[0]) >= 13  # Pillow 13 resizes tall crops vertical-pass first
    expected = np.load(PARITY / ("expected_logits_pillow13.npy" if pillow13 else "expected_logits.npy"))
    for precision in (["fp32", "tf32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]):
        model, _ = load_model(slim)
        logits = Predictor(model, device, precision)(batch).numpy()
        report("parity-fixture", precision, argmax_agree=f"{(logits.argmax(1) == expected.argmax(1)).mean():.4f}",
               max_abs_logit_diff=f"{np.abs(logits - expected).max():.5f}")


def tiny_spec() -> ModelSpec:
    return ModelSpec(32, 2, 4, 14, 518, 4, 256, [3, 5, -1], 4, 8, [f"class{i}" for i in range(79)])


def bench_e2e(device: torch.device, folder: Path, ann_path: Path, workers: List[int], resizes: List[str],
              batch_sizes: List[int], quick: bool, precisions: List[str]) -> None:
    from safetensors.torch import save_file
    from fathompipe.config import InferConfig, SplitSource
    from fathompipe.infer import run
    from fathompipe.jobs import InferJob
    spec = tiny_spec() if quick else full_spec()
    ckpt_dir = folder / ("ckpt-quick" if quick else "ckpt")
    ckpt_dir.mkdir(exist_ok=True)
    weights, meta = ckpt_dir / "random.inference.safetensors", ckpt_dir / "random.inference.json"
    if not meta.exists():
        model = random_model(spec, device)
        save_file({to_checkpoint_name(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(weights))
        meta.write_text(json.dumps({"spec": spec.__dict__}))
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
    n_rois = len(json.loads(ann_path.read_text())["annotations"])
    for precision in precisions:
        for batch_size in batch_sizes:
            for count in workers:
                for resize in resizes:  # side by side at each worker count
                    out = folder / f"e2e-{precision}-{batch_size}-{count}-{resize}" / "pred.csv"
                    shutil.rmtree(out.parent, ignore_errors=True)  # a run of its own, not the resumption of an earlier
                    t0 = time.perf_counter()
                    run(InferJob(SplitSource(str(ann_path), str(folder)), str(weights), str(out),
                                 InferConfig(device=str(device), precision=precision, batch_size=batch_size,
                                             num_workers=count, resize=resize)), progress=False)
                    dt = time.perf_counter() - t0
                    report("e2e", f"infer.run {precision} resize={resize} ({count} workers, batch {batch_size})"
                           f"{' quick' if quick else ''}", rois=n_rois, seconds=f"{dt:.1f}",
                           roi_per_s=f"{n_rois / dt:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="preprocess,worker,resize,model,parity,e2e")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=1500, help="synthetic images for e2e")
    parser.add_argument("--preprocess-images", type=int, default=40)
    parser.add_argument("--workers", default=str(max(1, (os.cpu_count() or 2) - 2)), help="comma-separated, for e2e")
    parser.add_argument("--resize", default="cpu,device", help="comma-separated infer.resize paths, for e2e")
    parser.add_argument("--worker-images", type=int, default=40, help="images for the worker and resize sections")
    parser.add_argument("--batch-sizes", default="64", help="comma-separated, for e2e")
    parser.add_argument("--e2e-precisions", default="fp16,bf16")
    parser.add_argument("--e2e-repeat", type=int, default=1, help="run e2e over the images this many times")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fathompipe-bench-infer"))
    parser.add_argument("--json-out")
    args = parser.parse_args()
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    sections = args.sections.split(",")
    folder = Path(args.workdir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    n = args.images if not args.quick else 12
    t0 = time.perf_counter()
    ann = make_split(folder / "images", max(n, args.preprocess_images, args.worker_images))
    print(f"synthetic split ready in {time.perf_counter() - t0:.1f}s", flush=True)
    if "preprocess" in sections:
        bench_preprocess(folder / "images", ann, args.preprocess_images if not args.quick else 6)
    if "worker" in sections:
        bench_worker(folder / "images", ann, args.worker_images if not args.quick else 6)
    if "resize" in sections:
        bench_resize(device, folder / "images", ann, args.worker_images if not args.quick else 6)
    if "parity" in sections:
        bench_parity_agreement(device)
    if "model" in sections:
        bench_model(device, args.quick)
    if "e2e" in sections:
        e2e_ann = repeat_split(ann, folder / "images", args.e2e_repeat) if args.e2e_repeat > 1 else ann
        precisions = args.e2e_precisions.split(",") if device.type == "cuda" else ["fp32"]
        bench_e2e(device, folder / "images", e2e_ann, [int(w) for w in args.workers.split(",")],
                  args.resize.split(","), [int(b) for b in args.batch_sizes.split(",")], args.quick, precisions)
    keys = ["section", "variant"] + sorted({k for r in rows for k in r} - {"section", "variant"})
    print(f"\n## bench/infer.py on {name}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(r.get(k, "") for k in keys) + " |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
