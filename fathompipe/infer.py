"""Inference stage: the winner's model over every ROI of a split, resumable, in one GPU job.

    python -m fathompipe.infer --checkpoint C --annotations A --images-dir D --output OUT.csv
        [--split train|test] [--device cpu|cuda] [--precision fp32|tf32|fp16|bf16]
        [--batch-size N] [--encoder-config FILE] [--shard I --num-shards K] [--resize auto|device|cpu]

ROIs are grouped by image into a fixed plan of batches; DataLoader workers decode each image once and
cut all its crops (--resize cpu), or only decode it while the device cuts and resizes the same bytes
(--resize device); the whole-image context is encoded once per image. Every finished batch is saved
atomically as a part file, so a job stopped by its time limit, preemption or scancel continues
where it stopped, and the result equals one uninterrupted run. When every shard is done, the parts
are merged (fathompipe/predictions.py, in bounded memory) into OUT.csv (competition format), OUT.parquet
(confidence, top-5, logits) and OUT.embeddings.npy (per ROI, the vector the classifier head sees). The parts
record the options that change results (fathompipe/part_options.py): a rerun with others is refused.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from fathompipe import atomic
from fathompipe.annotations import Annotation, Coco, Image, load_coco
from fathompipe.cli import add_options, from_args
from fathompipe.model.slim import CheckpointError, read_meta
from fathompipe.part_options import check_part_options, part_options
from fathompipe.model.weights import export_slim, load_model
from fathompipe.jobs import InferJob
from fathompipe.model.winner import CheckpointMismatch, FathomNetClassifier
from fathompipe.layout import OutputFiles, SlimFiles
from fathompipe.model.preprocess import crop_image, decode, normalization_lut, normalize_uint8, plan_crops
from fathompipe.model.resize import crops_rgb, pack_images
from fathompipe.predictions import merge

# Measured (BENCHMARKS.md): on a GPU, fp16 autocast agrees with fp32 and is the fastest such mode.
GPU_DEFAULT_PRECISION = "fp16"


@dataclass(frozen=True)
class Item:
    """Some ROIs of one image (an image with more ROIs than a batch is split into several items)."""

    image: Image
    annotations: Tuple[Annotation, ...]


def plan_batches(dataset: Coco, images: Sequence[Image], batch_size: int) -> List[List[Item]]:
    """A deterministic batch plan: images in id order, each batch at most `batch_size` ROIs.

    The plan depends only on the annotation file, the shard and the batch size, so batch i is the same
    ROIs in every run: resuming skips finished batches and recomputes nothing."""
    by_image = dataset.rois_of([image.id for image in images])
    batches: List[List[Item]] = []
    current: List[Item] = []
    count = 0
    for image in images:
        anns = by_image.get(image.id, [])
        for start in range(0, len(anns), batch_size):
            chunk = tuple(anns[start:start + batch_size])
            if count + len(chunk) > batch_size and current:
                batches.append(current)
                current, count = [], 0
            current.append(Item(image, chunk))
            count += len(chunk)
    if current:
        batches.append(current)
    return batches


class BatchDataset(Dataset):
    """Item i is batch i of the plan, run in DataLoader workers. With resize "cpu" a worker decodes, crops and
    resizes (Pillow): obj, env3, env5 and whole are uint8 (N, 256, 256, 3) crops. With "device" it only decodes:
    `pixels` holds the batch's images one after another (one buffer, one shared-memory segment), `shapes` their
    (H, W, C), `windows` (K, 5) the distinct crop windows (image, y0, y1, x0, x1), and obj, env3, env5 and whole
    are rows of `windows`; Predictor cuts and resizes them on the device, bit-identical to the cpu path."""

    def __init__(self, batches: List[List[Item]], images_dir: Path, naming: str, resize: str = "cpu"):
        self.batches = batches
        self.images_dir = images_dir
        self.naming = naming
        self.resize = resize

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Dict[str, object]:
        parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("obj", "env3", "env5", "whole", "whole_index")}
        images: List[np.ndarray] = []
        windows: List[np.ndarray] = []
        n_windows = n_whole = 0
        ann_ids: List[int] = []
        image_ids: List[int] = []
        notes: List[str] = []
        skipped: List[Tuple[int, int, str]] = []
        for item in self.batches[index]:
            path = self.images_dir / item.image.local_name(self.naming)
            if not path.exists():
                skipped += [(a.id, item.image.id, f"image missing: {path}") for a in item.annotations]
                continue
            bboxes = [a.bbox for a in item.annotations]
            try:
                if self.resize == "device":
                    arr, image_note = decode(path)
                    plan = plan_crops(arr.shape[0], arr.shape[1], bboxes)
                else:
                    crops = crop_image(path, bboxes)
            except Exception as exc:  # a corrupt file must not stop the job
                skipped += [(a.id, item.image.id, f"image unreadable: {type(exc).__name__}: {exc}")
                            for a in item.annotations]
                continue
            if self.resize == "device":
                rows = np.asarray(plan.windows, dtype=np.int64).reshape(-1, 4)
                windows.append(np.column_stack([np.full(len(rows), len(images)), rows]))
                images.append(arr)
                for key in ("obj", "env3", "env5", "whole"):
                    parts[key].append(getattr(plan, key) + n_windows)
                parts["whole_index"].append(plan.whole_index + n_whole)
                n_windows, n_whole, roi_notes = n_windows + len(rows), n_whole + len(plan.whole), plan.notes
            else:
                for key, crop in (("obj", crops.obj), ("env3", crops.env[3]), ("env5", crops.env[5]),
                                  ("whole", crops.env[-1])):
                    parts[key].append(crop)
                parts["whole_index"].append(crops.whole_index + n_whole)
                n_whole, image_note, roi_notes = n_whole + len(crops.env[-1]), crops.image_note, crops.notes
            ann_ids += [a.id for a in item.annotations]
            image_ids += [item.image.id] * len(item.annotations)
            notes += [("; ".join(n for n in (image_note, note) if n)) for note in roi_notes]

        def cat(key: str, empty: Tuple[int, ...], dtype: type) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(parts[key]) if parts[key] else np.empty(empty, dtype))

        crop_shape = (0,) if self.resize == "device" else (0, 256, 256, 3)
        crop_type = np.int64 if self.resize == "device" else np.uint8
        batch: Dict[str, object] = {
            "index": index, **{k: cat(k, crop_shape, crop_type) for k in ("obj", "env3", "env5", "whole")},
            "whole_index": cat("whole_index", (0,), np.int64),
            "annotation_id": ann_ids, "image_id": image_ids, "note": notes, "skipped": skipped}
        if self.resize == "device":
            pixels, shapes = pack_images(images, shared=get_worker_info() is not None)
            batch.update(pixels=pixels, shapes=torch.from_numpy(shapes),
                         windows=torch.from_numpy(np.concatenate(windows) if windows else np.empty((0, 5), np.int64)))
        return batch


def granted_gpus() -> Optional[str]:
    """The GPUs Slurm gave this job (SLURM_JOB_GPUS, SLURM_STEP_GPUS, SLURM_GPUS_ON_NODE), if any."""
    for var in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE"):  # GPU ids, ids, a count
        value = os.environ.get(var, "").strip()
        if value and not (var == "SLURM_GPUS_ON_NODE" and value == "0"):
            return f"{var}={value}"
    return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        granted = granted_gpus()
        if granted:  # a GPU was paid for and sits idle: say so loudly, the CPU is ~100x slower
            print(f"warning: this job was given a GPU ({granted}) but CUDA is unavailable (torch {torch.__version__}, "
                  f"built for CUDA {torch.version.cuda or 'none'}): running on the CPU, far slower. Install a CUDA "
                  f"build of torch (bash setup.sh on a GPU node) or check the node's driver (nvidia-smi).",
                  file=sys.stderr, flush=True)
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no GPU is visible (CUDA_VISIBLE_DEVICES, or a CPU node?)")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return GPU_DEFAULT_PRECISION if device.type == "cuda" else "fp32"
    if device.type == "cpu" and precision in ("tf32", "fp16"):
        raise RuntimeError(f"--precision {precision} needs a GPU; use fp32 or bf16 on the CPU")
    return precision


def batch_crops(batch: Dict[str, object], device: torch.device) -> Dict[str, torch.Tensor]:
    """A BatchDataset batch's uint8 (N, 256, 256, 3) obj, env3, env5 and whole crops on `device`: moved there
    (resize "cpu"), or cut and resized there from the decoded images (resize "device", fathompipe.model.resize)."""
    keys = ("obj", "env3", "env5", "whole")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if "pixels" not in tensors:
        return {k: tensors[k].to(device, non_blocking=True) for k in keys}
    resized = crops_rgb(tensors["pixels"].to(device, non_blocking=True), tensors["shapes"].numpy(),
                        tensors["windows"].numpy())
    return {k: resized[tensors[k].to(device)] for k in keys}


def resolve_resize(resize: str, device: torch.device) -> str:
    """auto: crops on the GPU when there is one (the workers then only decode); on the CPU, Pillow in the workers
    (the torch resize costs the main process more there than it saves the workers)."""
    if resize == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return resize


class Predictor:
    """The model on a device at a precision; maps a preprocessed batch to fp32 logits and embeddings."""

    def __init__(self, model: FathomNetClassifier, device: torch.device, precision: str):
        self.model = model.to(device)
        self.device = device
        self.precision = precision
        self.lut = normalization_lut().to(device)
        if device.type == "cuda":
            allow = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = allow
            torch.backends.cudnn.allow_tf32 = allow

    def __call__(self, batch: Dict[str, object]) -> torch.Tensor:
        """Logits only (the benchmarks compare these across precisions)."""
        return self.predict(batch)[0]

    def predict(self, batch: Dict[str, object]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, classes), embeddings (B, D)): the head's input comes from the same forward pass,
        so saving it changes no logit."""
        with torch.inference_mode():
            crops = batch_crops(batch, self.device)

        def prep(key: str) -> torch.Tensor:
            return normalize_uint8(crops[key], self.lut)

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        whole_index = batch["whole_index"]
        assert isinstance(whole_index, torch.Tensor)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            embeddings = self.model.embed(prep("obj"), [prep("env3"), prep("env5"), prep("whole")],
                                          [None, None, whole_index.to(self.device, non_blocking=True)])
            logits = self.model.classifier(embeddings)
        return (logits.float().reshape(-1, logits.shape[-1]).cpu(),
                embeddings.float().reshape(-1, embeddings.shape[-1]).cpu())


def _save_part(path: Path, batch: Dict[str, object], logits: torch.Tensor, embeddings: Optional[torch.Tensor]) -> None:
    buf = io.BytesIO()
    skipped = batch["skipped"]
    assert isinstance(skipped, list)
    kept = {} if embeddings is None else {"embeddings": embeddings.numpy().astype(np.float32)}
    np.savez(buf, annotation_id=np.asarray(batch["annotation_id"], np.int64),
             image_id=np.asarray(batch["image_id"], np.int64), logits=logits.numpy().astype(np.float32),
             note=np.asarray(batch["note"], dtype=str),
             skipped=np.asarray([json.dumps(s) for s in skipped], dtype=str), **kept)
    atomic.write_bytes(path, buf.getvalue())


def run_shard(job: InferJob, model_files: SlimFiles, dataset: Coco, out: OutputFiles,
              progress: bool = True) -> Dict[str, int]:
    """Compute every batch of this shard that has no part file yet."""
    o, shard, num_shards, batch_size, num_workers = job.options, job.shard, job.options.shards, \
        job.options.batch_size, job.options.num_workers
    dev = resolve_device(o.device)
    prec = resolve_precision(o.precision, dev)
    resize = resolve_resize(o.resize, dev)
    images = dataset.shard(shard, num_shards)
    plan = plan_batches(dataset, images, batch_size)
    todo = [i for i in range(len(plan)) if not out.part(shard, i).exists()]
    n_rois = sum(len(it.annotations) for b in plan for it in b)
    todo_rois = sum(len(it.annotations) for i in todo for it in plan[i])
    t0 = time.monotonic()
    model, spec = load_model(model_files, "cpu")
    predictor = Predictor(model, dev, prec)
    print(f"infer shard {shard}/{num_shards}: device={dev}"
          f"{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''} precision={prec} "
          f"resize={resize} batch_size={batch_size} workers={num_workers}; {n_rois} ROIs in {len(images)} images, "
          f"{len(plan)} batches, {len(plan) - len(todo)} already done; model loaded in {time.monotonic() - t0:.1f}s",
          flush=True)
    out.parts.mkdir(parents=True, exist_ok=True)
    # resize "device" batches carry decoded images (about 6 MB each, 150 MB a batch of 64 train-like ROIs): fewer of
    # them wait in shared memory per worker
    prefetch = 2 if resize == "device" else 4
    loader = DataLoader(BatchDataset([plan[i] for i in todo], Path(job.source.images_dir), job.source.naming, resize),
                        batch_size=None,
                        num_workers=num_workers, pin_memory=dev.type == "cuda",
                        persistent_workers=False, prefetch_factor=prefetch if num_workers else None)
    counts = {"rois": 0, "skipped": 0}
    first_batch_at: Optional[float] = None
    first_batch_rois = 0
    # part files are written (and fsynced) on a thread, overlapping the next batch on the device
    with ThreadPoolExecutor(max_workers=1) as saver, \
            tqdm(total=todo_rois, unit="ROI", desc=f"infer shard {shard}", disable=not progress, dynamic_ncols=True,
                 mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
        pending: Deque[Future] = deque()
        for batch in loader:
            logits, embeddings = predictor.predict(batch) if batch["annotation_id"] else (
                torch.empty((0, len(spec.class_names))), torch.empty((0, spec.hidden_size)))
            # the saver gets the batch's ids and notes, not its pixels; at most two saves wait (a slow disk
            # holds the loop back instead of filling memory)
            fields = {k: batch[k] for k in ("annotation_id", "image_id", "note", "skipped")}
            pending.append(saver.submit(_save_part, out.part(shard, todo[batch["index"]]), fields, logits,
                                        embeddings if o.embeddings else None))
            while len(pending) > 2:
                pending.popleft().result()
            counts["rois"] += len(batch["annotation_id"])
            counts["skipped"] += len(batch["skipped"])
            bar.update(len(batch["annotation_id"]) + len(batch["skipped"]))
            if first_batch_at is None:
                first_batch_at, first_batch_rois = time.monotonic(), counts["rois"]
        for future in pending:
            future.result()  # surface any write error before the shard is marked done
    seconds = time.monotonic() - t0
    steady = ""
    if first_batch_at is not None and counts["rois"] > first_batch_rois:
        rate = (counts["rois"] - first_batch_rois) / max(time.monotonic() - first_batch_at, 1e-9)
        steady = f" ({rate:.1f} ROI/s after the first batch)"
    print(f"infer shard {shard}: {counts['rois']} ROIs predicted, {counts['skipped']} skipped in {seconds:.1f}s, "
          f"{counts['rois'] / max(seconds, 1e-9):.1f} ROI/s{steady}", flush=True)
    atomic.write_json(out.shard_marker(shard, num_shards), counts)
    return counts


def slim_files(checkpoint: str | Path, encoder_config: Optional[str | Path]) -> SlimFiles:
    """Accept the Lightning .ckpt (slim files made or reused beside it) or the slim .safetensors."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: run the checkpoint stage first "
                              f"(python -m fathompipe.checkpoint --checkpoint {path})")
    if path.suffix == ".safetensors":
        return SlimFiles.of_weights(path)
    return export_slim(path, encoder_config)


def run(job: InferJob, progress: bool = True) -> Optional[Dict[str, int]]:
    """One shard of the stage (the callable the driver submits); merges when it is the last."""
    dataset = load_coco(job.source.annotations)  # a run's annotation table: its columns, no JSON parse
    files = slim_files(job.checkpoint, job.options.encoder_config)
    out = OutputFiles(Path(job.output))
    o = job.options
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device
    check_part_options(out, part_options(o, resolve_precision(o.precision, torch.device(device_type))))
    if not out.shard_marker(job.shard, o.shards).exists():
        run_shard(job, files, dataset, out, progress)
    class_names = read_meta(files)["spec"]["class_names"]
    merged = merge(dataset, out, class_names, o.shards, job.source.split, o.embeddings)
    if merged is not None:
        kept = f"embeddings in {out.embeddings}" if merged["embedded"] else "no embeddings" + (
            "" if job.options.embeddings else " (infer.embeddings=false)")
        print(f"wrote {out.csv} and {out.parquet}: {merged['predicted']} predictions; "
              f"{merged['skipped']} ROIs skipped (listed in {out.skipped}); {kept}", flush=True)
        if job.options.embeddings and merged["embedded"] < merged["predicted"]:
            print(f"note: no embeddings written: some batches were computed by a version that did not save them; "
                  f"for embeddings, delete {out.parts} and rerun", flush=True)
    return merged


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.infer", description=__doc__.split("\n\n")[0])
    add_options(parser, InferJob)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        run(from_args(InferJob, args))
    except (CheckpointError, CheckpointMismatch, RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
