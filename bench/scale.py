"""Production scale: the pipeline's steps at 23.7k, 200k and 2M synthetic ROIs, time and peak memory of each.

    python bench/scale.py [--sizes 23699,200000,2000000] [--sections preflight,download,merge,status]
                          [--workdir /tmp/fathompipe-scale] [--slurm-check]

MBARI's deployments have about 2,000,000 ROIs on 400,000 images. The inputs (support/synthetic.py's
production-like COCO files; the infer stage's part files) are made once into WORKDIR and reused. Each step
runs in a fresh Python process: its time is the step's own (imports excluded), its peak is the process's
VmHWM (the kernel's peak resident set, counted from exec), imports included.
  preflight  what submit does before queueing: parse and validate the annotation file, cut the run's table
  download   one download task, shard 0 of 1,000 (one download process), its images served on loopback;
             "by hand" is the same task given the whole COCO file instead of the run's table
  merge      the infer stage's merge of every part file (batches of 64 ROIs, 1,024-float embeddings), read from
             disk (the page cache dropped first, where run as root); its CPU time beside its wall time
  status     `python -m fathompipe.status` on a queued run of 2 x 1,000 download shards (real Slurm)
  map        the embeddings map alone, today's exact pipeline beside the stage's, and the fraction of each ROI's
             15 nearest neighbours in the map that share its true label
  evaluate   `python -m fathompipe.evaluate` with FiftyOne and the embeddings map on a MongoDB of its own, part
             by part (the stage's own record in evaluate.done), mongod's memory beside the stage's; then each
             saved view opened and counted
The last column is k, the growth exponent of time from 200k to 2M ROIs (time ~ N^k); for a download task, whose
shard (one of 1,000 at every size) holds 10x the images at 10x the ROIs, k of its time per image.
--slurm-check submits a 2M-ROI train split with 1,000 download shards to the real Slurm, lets the first
four shards run, and prints their MaxRSS from sacct and whether every image arrived intact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARDS = 1000
PORT = 18765  # the loopback image server; fixed, since the cached annotation files name it in every URL
BASE_URL = f"http://127.0.0.1:{PORT}/images/"

# run in a fresh interpreter: SETUP (imports, inputs), then STEP timed; prints {"seconds", "cpu", "peak", ...}
CHILD = """
import json, re, sys, time
sys.path.insert(0, {root!r})
{setup}
t0, c0 = time.perf_counter(), time.process_time()
{step}
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({{"seconds": seconds, "cpu": cpu, "peak": peak, **globals().get("extra", {{}})}}))
"""


def child(setup: str, step: str, env: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    code = CHILD.format(root=str(ROOT), setup=textwrap.dedent(setup), step=textwrap.dedent(step))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"step failed:\n{step}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- inputs ---------------------------------------------------------------------------------------------------

def annotations(work: Path, n: int) -> Path:
    from support.synthetic import production_like_coco
    path = work / f"coco-{n}.json"
    if not path.exists():
        production_like_coco(path.with_suffix(".tmp"), n, base_url=BASE_URL).rename(path)
    return path


def table(work: Path, n: int) -> Path:
    from fathompipe.annotation_table import read_meta, write_table
    from fathompipe.annotations import load_coco
    path = work / f"table-{n}"
    if read_meta(path) is None:
        write_table(load_coco(annotations(work, n)), path, SHARDS)
    return path


def serve_images(work: Path, n: int, shards: range) -> Dict[str, str]:
    """Synthetic PNGs for the images of `shards` (of SHARDS) in the served folder; file name -> sha256."""
    from fathompipe.annotation_table import read_shard
    from support.synthetic import synthetic_png
    served = work / "served"
    served.mkdir(exist_ok=True)
    digests = {}
    for shard in shards:
        for image in read_shard(table(work, n), shard, SHARDS):
            path = served / image.file_name
            if not path.exists():
                path.write_bytes(synthetic_png(image.width, image.height, image.id, noise=0.3))
            digests[image.file_name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def parts(work: Path, n: int) -> Path:
    """The infer stage's part files for every ROI of the split (support/synthetic.py's model-like parts)."""
    from fathompipe.annotations import load_coco
    from fathompipe.layout import OutputFiles
    from support.synthetic import model_like_parts
    out = OutputFiles(work / f"infer-{n}" / "predictions.csv")
    if not out.shard_marker(0, 1).exists():
        model_like_parts(load_coco(table(work, n)), out)
    return out.csv


# --- steps ----------------------------------------------------------------------------------------------------

def preflight(work: Path, n: int) -> Dict[str, float]:
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    try:
        return child(f"""
            from fathompipe.config import Origins, load_config
            from fathompipe.layout import RunPaths
            from fathompipe.pipeline.preflight import preflight
            cfg = load_config(None, ["data.splits=[train]", "data.train.annotations={annotations(work, n)}",
                                     "data.train.images_dir={work / 'images'}", "run_dir={run_dir}",
                                     "download.num_shards={SHARDS}", "checkpoint.path={work / 'none.ckpt'}"])
            """, """
            errors = preflight(cfg, RunPaths.of(cfg.run_dir), Origins(base="bench"), write_tables=True)
            assert not errors, errors
            """)
    finally:
        shutil.rmtree(run_dir)


def download(work: Path, n: int, by_hand: bool = False) -> Dict[str, float]:
    source = annotations(work, n) if by_hand else table(work, n)
    images = work / f"images-{n}-{'json' if by_hand else 'table'}"
    shutil.rmtree(images, ignore_errors=True)
    result = child(f"""
        from fathompipe.config import DownloadConfig, SplitSource
        from fathompipe.download import download_shard
        from fathompipe.jobs import DownloadJob
        job = DownloadJob(SplitSource("{source}", "{images}", "train"),
                          DownloadConfig(num_shards={SHARDS}, processes=1), shard=0, name="train")
        """, """
        summary = download_shard(job, progress=False)
        assert summary.complete, summary.line()
        extra = {"images": summary.total}
        """)
    shutil.rmtree(images)
    return result


def cold_cache() -> None:
    """Drop the page cache (root only; elsewhere a no-op): the merge then reads its parts from disk at every size,
    as a GPU job's merge does on a cluster's file system; warm, 200k ROIs of parts sit in memory and 2M do not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        pass


def merge(work: Path, n: int) -> Dict[str, float]:
    csv = parts(work, n)
    csv.unlink(missing_ok=True)  # the completion test: without it the merge runs (outputs newer than it are reused)
    cold_cache()
    result = child(f"""
        from pathlib import Path
        from fathompipe.annotations import load_coco
        from fathompipe.layout import OutputFiles
        from fathompipe.predictions import merge
        from fathompipe.evaluation.taxonomy import load_taxonomy
        coco, out = load_coco("{table(work, n)}"), OutputFiles(Path("{csv}"))
        """, """
        result = merge(coco, out, list(load_taxonomy()), 1, "train")
        assert result["predicted"] == len(coco.annotations) == result["embedded"], result
        """)
    return result


def status(work: Path, n: int) -> Optional[Dict[str, float]]:
    if shutil.which("sbatch") is None:
        return None
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="status-"))
    ann = annotations(work, n)
    overrides = [f"run_dir={run_dir}", "cluster=slurm", "data.splits=[train,test]", f"download.num_shards={SHARDS}",
                 f"data.train.annotations={ann}", f"data.test.annotations={ann}",
                 f"data.train.images_dir={work / 'images'}", f"data.test.images_dir={work / 'images'}",
                 f"checkpoint.path={work / 'none.ckpt'}", "download.resources.extra={begin: now+1hour}",
                 "checkpoint.resources.extra={begin: now+1hour}", "infer.resources.mem_gb=2"]
    proc = subprocess.run([sys.executable, "-m", "fathompipe.submit", *overrides], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        runs = [child("from fathompipe.status import main", f"""
            import contextlib, io
            with contextlib.redirect_stdout(io.StringIO()) as out:
                assert main(["--run-dir", "{run_dir}", "--json"]) == 0
            extra = {{"pending": sum(s["pending"] for s in json.loads(out.getvalue())["stages"])}}
            """) for _ in range(3)]
        assert runs[0]["pending"] >= 2 * SHARDS, runs[0]
        return min(runs, key=lambda r: r["seconds"])
    finally:
        subprocess.run([sys.executable, "-m", "fathompipe.cancel", "--run-dir", str(run_dir)], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def predictions(work: Path, n: int) -> Path:
    """The infer stage's outputs for the split (the merge of `parts`, once)."""
    csv = parts(work, n)
    if not csv.exists():
        from fathompipe.annotations import load_coco
        from fathompipe.evaluation.taxonomy import load_taxonomy
        from fathompipe.layout import OutputFiles
        from fathompipe.predictions import merge as merge_parts
        merge_parts(load_coco(table(work, n)), OutputFiles(csv), list(load_taxonomy()), 1, "train")
    return csv.with_suffix(".parquet")


def map_quality(work: Path, n: int, exact: bool) -> Optional[Dict[str, float]]:
    """The embeddings map alone (fiftyone_review.map_2d) on the split's embeddings, read as the stage reads them:
    main's exact pipeline (every ROI in the exact 15-NN graph, umap-learn's 200 epochs) or the stage's (fitted on a
    sample beyond UMAP_SAMPLE, UMAP_EPOCHS), and how many of each ROI's 15 nearest neighbours in the map share its
    true label. The exact pipeline is not run at 2M (its neighbour search grows as N^1.9: about 1.5 hours here)."""
    if exact and n > 200_000:
        return None
    parquet = predictions(work, n)
    return child(f"""
        import numpy as np
        from fathompipe.annotations import load_coco
        from fathompipe.embeddings import load_embeddings
        from fathompipe.evaluation.fiftyone_review import map_2d
        from support.map_quality import neighbour_agreement
        ids, vectors = load_embeddings("{parquet.with_suffix('.embeddings.npy')}")
        coco = load_coco("{table(work, n)}")
        order = np.argsort(coco.annotations.id)
        labels = coco.annotations.category_id[order][np.searchsorted(coco.annotations.id[order], ids)]
        """, f"""
        points, method = map_2d(vectors, sample={n + 1 if exact else None}, epochs={200 if exact else None})
        extra = {{"agreement": neighbour_agreement(points, labels), "method": method}}
        """)


def evaluate(work: Path, n: int) -> Dict[str, Dict[str, float]]:
    """`python -m fathompipe.evaluate` on the split into a fresh dataset of a MongoDB of its own (FiftyOne on, the
    map on; WiredTiger cache as in an 8 GB evaluate job), part by part from its evaluate.done; mongod's resident
    memory sampled every 0.2 s beside it. Then each saved view opened and counted in a fresh process."""
    import threading

    import psutil

    from fathompipe.evaluation.private_database import cache_gb_for
    from support.mongod import PrivateMongod

    parquet = predictions(work, n)
    report_dir = Path(tempfile.mkdtemp(dir=work, prefix="evaluate-"))
    mongod = PrivateMongod(cache_gb=cache_gb_for(8))
    samples: List[Tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        process = psutil.Process(mongod.proc.pid)
        while not stop.is_set():
            samples.append((time.time(), process.memory_info().rss))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    env = {"FIFTYONE_DATABASE_URI": mongod.uri, "FIFTYONE_DATABASE_NAME": f"scale-{n}"}
    try:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "fathompipe.evaluate", "--annotations", str(table(work, n)),
                               "--predictions", str(parquet), "--report-dir", str(report_dir), "--split", "train",
                               "--dataset", f"scale-{n}", "--database-uri", mongod.uri], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, **env})
        wall = time.monotonic() - t0
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        done = json.loads((report_dir / "evaluate.done").read_text())
        views = child(f"""
            import os
            os.environ.update({env!r})
            import fiftyone as fo
            ds = fo.load_dataset("scale-{n}")
            """, """
            extra = {"views": {}}
            for name in ds.list_saved_views():
                t = time.perf_counter()
                extra["views"][name] = [len(ds.load_saved_view(name)), time.perf_counter() - t]
            """)
    finally:
        stop.set()
        sampler.join()
        mongod.stop()
        shutil.rmtree(report_dir, ignore_errors=True)
    rows: Dict[str, Dict[str, float]] = {}
    for name, part in done["parts"].items():
        during = [rss for t, rss in samples if part["started"] - 0.2 <= t <= part["ended"] + 0.2]
        rows[f"evaluate: {name}"] = {"seconds": part["seconds"], "peak": part["peak_gb"] * 2**30,
                                     "mongod": max(during, default=0)}
    rows["evaluate: whole stage (process wall time, imports included)"] = {
        "seconds": wall, "peak": max(r["peak"] for r in rows.values()), "mongod": max(s for _, s in samples)}
    for name, (count, seconds) in views["views"].items():
        rows[f"open and count the saved view {name.split('-', 1)[1]}"] = {"seconds": seconds, "peak": views["peak"],
                                                                        "n": count}
    return rows


MERGE = "infer merge, embeddings included (page cache dropped first, as root)"
STEPS = {
    "preflight": [("pre-flight: parse + validate + cut the table (login node)", preflight)],
    "download": [("download task, shard 0 of 1,000, from the run's table", download),
                 ("download task by hand, shard 0 of 1,000, from the whole COCO file",
                  lambda w, n: download(w, n, by_hand=True))],
    "merge": [(MERGE, merge)],
    "status": [("status, a queued run of 2 x 1,000 download shards", status)],
    "map": [("embeddings map, the exact pipeline of main (15-NN graph of every ROI, 200 epochs)",
             lambda w, n: map_quality(w, n, True)),
            ("embeddings map, the stage's (100 epochs; fitted on 150,000 ROIs beyond that, the rest placed)",
             lambda w, n: map_quality(w, n, False))],
    "evaluate": [],  # one row per part of the stage: `evaluate`
}


# steps bound by the disk at 2M (17 GB read and written), whose CPU time is printed beside the wall time
WITH_CPU = (MERGE,)


def report(rows: List[Tuple[str, Dict[int, Optional[Dict[str, float]]]]], sizes: List[int]) -> None:
    print("\n## bench/scale.py: time and peak memory per step\n")
    print("| step | " + " | ".join(f"{n:,} ROIs" for n in sizes) + " | k (200k -> 2M) |")
    print("|---|" + "---|" * len(sizes) + "---|")
    for name, by_size in rows:
        cells = [(f"{r['seconds']:.2f} s" + (f" (CPU {r['cpu']:.2f} s)" if "cpu" in r and name in WITH_CPU else "")
                  + f", {r['peak'] / 2**30:.2f} GiB"
                  + (f" + mongod {r['mongod'] / 2**30:.2f} GiB" if r.get("mongod") else "")
                  + (f" ({r['n']:,} patches)" if "n" in r else "")
                  + (f" ({r['images']:,} images, {1000 * r['seconds'] / r['images']:.1f} ms each)" if "images" in r
                     else "")
                  + (f"; label agreement of the 15 nearest {r['agreement']:.3f}" if "agreement" in r else "")) if r
                 else ""
                 for r in (by_size.get(n) for n in sizes)]
        a, b = by_size.get(200_000), by_size.get(2_000_000)
        k = f"{math.log(b['seconds'] / a['seconds']) / math.log(10):.2f}" if a and b else ""
        if a and b and "images" in a:  # a shard of 1,000 holds 10x the images at 10x the ROIs: k of the time per image
            k = f"{math.log(b['seconds'] / b['images'] * a['images'] / a['seconds']) / math.log(10):.2f} per image"
        if a and b and name in WITH_CPU:
            k += f" (CPU {math.log(b['cpu'] / a['cpu']) / math.log(10):.2f})"
        print(f"| {name} | " + " | ".join(cells) + f" | {k} |")


def slurm_check(work: Path, n: int = 2_000_000, first: int = 4) -> None:
    """A 2M-ROI train split with 1,000 download shards on the real Slurm: the first shards' MaxRSS and images."""
    from fathompipe.layout import RunPaths
    from fathompipe.pipeline.scheduler import query_states
    digests = serve_images(work, n, range(first))
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="slurm-"))
    images = run_dir / "images"
    overrides = [f"run_dir={run_dir}", "cluster=slurm", "data.splits=[train]", f"download.num_shards={SHARDS}",
                 f"data.train.annotations={annotations(work, n)}", f"data.train.images_dir={images}",
                 f"checkpoint.path={work / 'none.ckpt'}", f"download.resources.array_parallelism={first}",
                 "checkpoint.resources.extra={begin: now+1hour}", "infer.resources.mem_gb=2"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fathompipe.submit", *overrides], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    submit_s = time.monotonic() - t0
    paths = RunPaths.of(run_dir)
    state = json.loads(paths.run_json.read_text())
    tasks = state["stages"]["download"]["submissions"][0]["tasks"]
    jobs = [tasks[f"train/{k}"] for k in range(first)]
    try:
        deadline = time.monotonic() + 1800
        ended = {"COMPLETED", "FAILED", "CANCELLED", "OUT_OF_MEMORY", "TIMEOUT"}
        while not {query_states(jobs).get(job) for job in jobs} <= ended:
            assert time.monotonic() < deadline, "the first shards did not finish within 30 minutes"
            time.sleep(2)
        states = query_states(jobs)
        time.sleep(5)  # sacct's MaxRSS of a finished step arrives with its accounting record
    finally:
        subprocess.run([sys.executable, "-m", "fathompipe.cancel", "--run-dir", str(run_dir)], cwd=ROOT,
                       capture_output=True)
    print(f"\n## bench/scale.py --slurm-check: {n:,} ROIs, {SHARDS:,} download shards on the real Slurm "
          f"(submit took {submit_s:.1f} s)\n")
    print("| task | state | images intact | MaxRSS (sacct, sampled every second, every process of the step added up) |")
    print("|---|---|---|---|")
    from fathompipe.layout import ShardFiles
    for k, job in enumerate(jobs):
        out = subprocess.run(["sacct", "-n", "-P", "-j", job, "--format=JobID,MaxRSS"], capture_output=True,
                             text=True).stdout
        rss = max((_bytes(line.split("|")[1]) for line in out.splitlines() if "|" in line), default=0)
        records = ShardFiles.of(paths.state("download"), "train", k, SHARDS).load_records()
        intact = sum(r.status == "ok" and r.sha256 == digests.get(Path(r.path).name) for r in records.values())
        print(f"| train/{k} ({job}) | {states.get(job)} | {intact}/{len(records)} | {rss / 2**20:.0f} MiB |")
    shutil.rmtree(run_dir, ignore_errors=True)


def _bytes(value: str) -> int:
    value = value.strip()
    if not value:
        return 0
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(value[-1], 1)
    return int(float(value.rstrip("KMG")) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", default="23699,200000,2000000")
    parser.add_argument("--sections", default=",".join(STEPS), help=f"any of {', '.join(STEPS)}")
    parser.add_argument("--workdir", default="/tmp/fathompipe-scale")
    parser.add_argument("--slurm-check", action="store_true", help="only the 2M-ROI download shards on Slurm")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from support.fakeserver import FakeFathomNet, ServerThread
    with ServerThread(FakeFathomNet(work / "served"), port=PORT):
        if args.slurm_check:
            slurm_check(work)
            return
        sizes = [int(s) for s in args.sizes.split(",")]
        for n in sizes:
            serve_images(work, n, range(1))
        rows: List[Tuple[str, Dict[int, Optional[Dict[str, float]]]]] = []
        for section in args.sections.split(","):
            for name, step in STEPS[section]:
                rows.append((name, {n: step(work, n) for n in sizes}))
                print(f"done: {name}: {json.dumps(rows[-1][1])}", file=sys.stderr, flush=True)
            if section == "evaluate":
                by_size = {}
                for n in sizes:
                    by_size[n] = evaluate(work, n)
                    print(f"done: evaluate at {n:,}: {json.dumps(by_size[n])}", file=sys.stderr, flush=True)
                for name in by_size[sizes[-1]]:
                    rows.append((name, {n: by_size[n].get(name) for n in sizes}))
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs: "
          f"python bench/scale.py {' '.join(sys.argv[1:])}")
    report(rows, sizes)


if __name__ == "__main__":
    main()
