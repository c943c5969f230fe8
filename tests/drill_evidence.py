"""What a failure drill redid and lost, measured from evidence (the drill table holds no typed-in number).

- images redone: files the stand-in server sent in full more than once after the fault, counting an
  image already on disk then as sent once, read from its request log (`FakeFathomNet.log`);
- ROIs redone: the ROIs of inference part files that existed when the fault hit and were written
  again afterwards (modification time or content hash changed) or are gone;
- data lost: images whose final bytes differ from the source (or that are missing while the source
  has them), plus annotations whose final prediction differs from a clean run's (or is missing).
"""
from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from support.fakeserver import FakeFathomNet


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path, pattern: str) -> Dict[str, Tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, _sha256(p)) for p in sorted(folder.glob(pattern))}


def _rois(part: Path) -> int:
    with np.load(part) as z:
        return len(z["annotation_id"]) + len(z["skipped"])


@dataclass(frozen=True)
class Snapshot:
    """The evidence at the moment of the fault, to compare the recovered run against."""

    served: int  # entries in the server's request log
    images: Dict[str, Tuple[int, str]]  # final image files on disk: name -> (mtime_ns, sha256)
    parts: Dict[str, Tuple[int, str]]  # inference part files: name -> (mtime_ns, sha256)
    part_rois: Dict[str, int]  # inference part files: name -> ROIs it holds


def parts_dir(run_dir: Path, split: str = "test") -> Path:
    return run_dir / "infer" / split / "predictions.parts"


def snapshot(server: FakeFathomNet, images_dir: Path, run_dir: Path, split: str = "test") -> Snapshot:
    served = len(server.log)  # first: anything logged later counts as after the fault
    parts = _files(parts_dir(run_dir, split), "*.npz")
    rois = {name: _rois(parts_dir(run_dir, split) / name) for name in parts}
    return Snapshot(served, _files(images_dir, "*.png"), parts, rois)


def images_redone(server: FakeFathomNet, before: Snapshot) -> int:
    """Files sent in full more than once since the fault, an image on disk at the fault counting as sent."""
    sent = Counter(s.name for s in server.log[before.served:] if s.complete)
    return sum(1 for name, n in sent.items() if n + (name in before.images) > 1)


def rois_redone(before: Snapshot, run_dir: Path, split: str = "test") -> int:
    """ROIs of the part files present at the fault that were rewritten or removed since."""
    now = _files(parts_dir(run_dir, split), "*.npz")
    return sum(before.part_rois[name] for name, seen in before.parts.items() if now.get(name) != seen)


def predictions(csv_path: Path) -> Dict[int, str]:
    """annotation_id -> predicted name, from a submission-format CSV and the skipped CSV beside it."""
    rows: Dict[int, str] = {}
    for path, column in ((csv_path, "concept_name"), (csv_path.with_name(csv_path.stem + ".skipped.csv"), "reason")):
        if path.exists():
            with open(path, newline="") as fh:
                rows.update({int(row["annotation_id"]): f"{column}: {row[column]}" for row in csv.DictReader(fh)})
    return rows


def data_lost(annotations: dict, images_dir: Path, source_dir: Path, final_csv: Path, clean_csv: Path) -> int:
    """Images not byte-identical to the source, plus annotations predicted otherwise than by a clean run.

    `annotations` is the run's COCO file as loaded; `clean_csv` is the predictions of the same inputs
    without the fault.
    """
    lost_images = sum(1 for im in annotations["images"] if (source_dir / im["file_name"]).exists()
                      and (not (images_dir / im["file_name"]).exists()
                           or _sha256(images_dir / im["file_name"]) != _sha256(source_dir / im["file_name"])))
    got, want = predictions(final_csv), predictions(clean_csv)
    lost_rois = sum(1 for a in annotations["annotations"] if a["id"] not in want or got.get(a["id"]) != want[a["id"]])
    return lost_images + lost_rois


def clean_run(checkpoint: Path, annotations: Path, images_dir: Path, out_dir: Path, encoder_config: Path) -> Path:
    """Predictions of the same inputs by one uninterrupted in-process run (the reference for data lost)."""
    from fathompipe.config import InferConfig, SplitSource
    from fathompipe.infer import run
    from fathompipe.jobs import InferJob

    out = out_dir / "predictions.csv"
    run(InferJob(SplitSource(str(annotations), str(images_dir)), str(checkpoint), str(out),
                 InferConfig(device="cpu", batch_size=16, num_workers=0, encoder_config=str(encoder_config))),
        progress=False)
    return out
