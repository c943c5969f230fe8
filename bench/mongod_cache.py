"""Memory of the private database's mongod with and without a bounded WiredTiger cache, on the evaluate
stage's kind of work: insert a split's samples, read them all back, write a predictions field on every
one, index the fields the review views use.

    python bench/mongod_cache.py [--samples 400000] [--caches none,0.25,1]

Each variant is a fresh mongod (fathompipe.evaluation.private_database.ManagedMongod: the socket, the data
directory, the options the evaluate job uses; `none` leaves mongod's default cache, half the machine's
memory less 1 GB) on a temporary directory; the documents are the stage's (fiftyone_io's sample
documents, 2.64 ground-truth boxes a sample as in the train split, predictions with top-5 names and
scores), written with pymongo. Printed: time of each phase and mongod's resident memory after it, and
its peak (VmHWM). The evaluate job's mongod gets a quarter of `evaluate.resources.mem_gb`.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 5000


def sample(i: int, rng: random.Random) -> Dict[str, object]:
    boxes = [{"_cls": "Detection", "tags": [], "attributes": {}, "label": f"class-{rng.randrange(79)}",
              "bounding_box": [rng.random() for _ in range(4)], "annotation_id": i * 3 + k}
             for k in range(2 if rng.random() < 0.36 else 3)]  # 2.64 a sample, as train's 23,699 / 8,980
    return {"filepath": f"/data/train_images/{i}.png", "tags": ["train"], "split": "train", "image_id": i,
            "metadata": {"_cls": "ImageMetadata", "width": 1920, "height": 1080},
            "ground_truth": {"_cls": "Detections", "detections": boxes}}


def predictions(doc: Dict[str, object], rng: random.Random) -> Dict[str, object]:
    dets = []
    for box in doc["ground_truth"]["detections"]:  # type: ignore[index]
        dets.append({**box, "confidence": rng.random(), "top5_names": [f"class-{rng.randrange(79)}" for _ in range(5)],
                     "top5_scores": sorted((rng.random() for _ in range(5)), reverse=True),
                     "hierarchical_distance": rng.randrange(13)})
    return {"_cls": "Detections", "detections": dets}


def rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def peak_mb(pid: int) -> float:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def variant(n: int, cache_gb: Optional[float]) -> List[str]:
    from pymongo import MongoClient, UpdateOne

    from fathompipe.evaluation.private_database import ManagedMongod

    rows = []
    with tempfile.TemporaryDirectory(prefix="fathompipe-bench-mongod-") as tmp:
        db = ManagedMongod(Path(tmp) / "db", cache_gb).acquire()
        try:
            proc = psutil.Process(db.pid())
            samples = MongoClient(db.uri)["bench"]["samples"]
            rng = random.Random(0)
            label = "none (mongod's default)" if cache_gb is None else f"{cache_gb:g} GB"

            def phase(name: str, t0: float) -> None:
                rows.append(f"| {label} | {name} | {time.monotonic() - t0:.1f} | {rss_mb(proc):.0f} |")

            t0 = time.monotonic()
            for start in range(0, n, BATCH):
                samples.insert_many([sample(i, rng) for i in range(start, min(n, start + BATCH))], ordered=False)
            phase(f"insert {n:,} samples", t0)
            t0 = time.monotonic()
            ids, docs = [], []
            for doc in samples.find({"split": "train"}, {"ground_truth": 1}):
                ids.append(doc["_id"])
                docs.append(doc)
            phase("read every sample's ground truth", t0)
            t0 = time.monotonic()
            for start in range(0, n, BATCH):
                samples.bulk_write([UpdateOne({"_id": d["_id"]}, {"$set": {"model_predictions": predictions(d, rng)}})
                                    for d in docs[start:start + BATCH]], ordered=False)
            del docs, ids
            phase("write predictions on every sample", t0)
            t0 = time.monotonic()
            for key in ("split", "image_id", "ground_truth.detections.annotation_id",
                        "model_predictions.detections.confidence"):
                samples.create_index(key)
            phase("index the review views' fields", t0)
            size = samples.database.command("dbStats")["dataSize"] / 2**20
            rows.append(f"| {label} | **peak resident (VmHWM)**, data {size:,.0f} MB | | **{peak_mb(proc.pid):.0f}** |")
            samples.database.client.close()
        finally:
            db.release()
    return rows


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/mongod_cache.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400_000)
    parser.add_argument("--caches", default="none,0.25,1", help="comma-separated GB, `none`: mongod's default")
    args = parser.parse_args(argv)
    print(f"machine: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB\n")
    print("| WiredTiger cache | phase | seconds | mongod resident MB after |\n|---|---|---|---|")
    for value in args.caches.split(","):
        for row in variant(args.samples, None if value == "none" else float(value)):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
