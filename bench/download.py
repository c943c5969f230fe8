"""Download benchmark: fathompipe against a straightforward aiohttp loop, on one loopback server.

    python bench/download.py [--images 1000] [--latency-ms 20]

The baseline is what users write today: a semaphore of 50, no retries, write the body on HTTP 200.
Each client runs in its own process against a fresh server process (so fault sequences match and
peak memory is the client's own; fathompipe's counts each download process at the largest one's
peak). Scenarios: a clean server and the realistic fault mix (10% 503, 5% 429, 5% dropped
connections, 5% short bodies, 3% corrupt 200s, 2% permanent 404s), both with latency. Clients
alternate for --repeats rounds; the table shows the median time. Prints images/s, MB/s, peak RSS,
and intact images after one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAIVE = r'''
import asyncio, json, resource, sys, time
from pathlib import Path
import aiohttp
ann, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
async def main():
    sem = asyncio.Semaphore(50)
    async with aiohttp.ClientSession() as session:
        async def one(im):
            async with sem:
                try:
                    async with session.get(im["coco_url"]) as r:
                        if r.status == 200:
                            (out / im["file_name"]).write_bytes(await r.read())
                except Exception:
                    pass
        await asyncio.gather(*(one(im) for im in ann["images"]))
t0 = time.perf_counter()
asyncio.run(main())
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_mb}))
'''

FATHOMPIPE = r'''
import json, resource, sys, time
from fathompipe.config import DownloadConfig, SplitSource
from fathompipe.download import download_shard, process_count
from fathompipe.jobs import DownloadJob
options = DownloadConfig(num_shards=1, concurrency=50, per_host=50, max_attempts=8, backoff_base_s=0.2,
                         backoff_max_s=5)
t0 = time.perf_counter()
s = download_shard(DownloadJob(SplitSource(sys.argv[1], sys.argv[2]), options), progress=False)
seconds = time.perf_counter() - t0
n = process_count(options, s.total)
own, child = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
# every download process counted at the largest one's peak, shared pages included: an upper bound
print(json.dumps({"seconds": seconds, "peak_mb": own + (n * child if n > 1 else 0), "complete": s.complete,
                  "processes": n}))
'''


def _image(args: tuple) -> None:
    from support.synthetic import synthetic_png
    path, w, h, seed = args
    if not path.exists():
        path.write_bytes(synthetic_png(w, h, seed, noise=0.5))


def make_images(folder: Path, n: int, width: int, height: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"img{i:05d}.png", "width": width, "height": height,
               "coco_url": f"http://127.0.0.1:PORT/images/img{i:05d}.png"} for i in range(1, n + 1)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_image, [(folder / im["file_name"], width, height, im["id"]) for im in images], chunksize=16))
    path = folder.parent / "annotations.template.json"
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_client(code: str, template: Path, serve_dir: Path, work: Path, faults: str, latency_ms: float) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "support.fakeserver", "--dir", str(serve_dir), "--port",
                               str(port), "--faults", faults, "--latency-ms", str(latency_ms)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server.stdout.readline()  # "serving ..."
    time.sleep(0.3)
    ann = work / "annotations.json"
    ann.write_text(template.read_text().replace("PORT", str(port)))
    out = work / "out"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(ann), str(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=1800)
    finally:
        server.terminate()
        server.wait(10)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    images = json.loads(ann.read_text())["images"]
    from support.fakeserver import FakeFathomNet, Faults
    probe = FakeFathomNet(serve_dir, Faults.realistic() if faults == "realistic" else Faults())
    servable = [im for im in images if not probe.is_missing(im["file_name"])]
    intact = sum((out / im["file_name"]).exists() and (out / im["file_name"]).read_bytes()
                 == (serve_dir / im["file_name"]).read_bytes() for im in servable)
    corrupt = sum((out / im["file_name"]).exists() for im in images) - intact
    mb = sum((serve_dir / im["file_name"]).stat().st_size for im in servable) / 1e6
    result.update(intact=intact, servable=len(servable), corrupt_kept=corrupt, mb=mb)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--height", type=int, default=540)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fathompipe-bench-download"))
    args = parser.parse_args()
    base = Path(args.workdir)
    t0 = time.perf_counter()
    template = make_images(base / "served", args.images, args.width, args.height)
    print(f"{args.images} images of {args.width}x{args.height} ready in {time.perf_counter() - t0:.0f}s", flush=True)
    runs: dict = {}
    for faults in ("none", "realistic"):
        for _ in range(args.repeats):
            for name, code in (("straightforward loop", NAIVE), ("fathompipe", FATHOMPIPE)):
                work = Path(tempfile.mkdtemp(dir=base))
                r = run_client(code, template, base / "served", work, faults, args.latency_ms)
                shutil.rmtree(work)
                runs.setdefault((faults, name), []).append(r)
                print(f"{faults:9s} {name:20s} {r}", flush=True)
    print(f"\n## bench/download.py: {args.images} images ({args.width}x{args.height} PNG), "
          f"{args.latency_ms:.0f} ms latency, loopback, {os.cpu_count()} cores, median of {args.repeats}\n")
    print("| server | client | processes | images/s | MB/s | peak RSS MB | intact after one run | corrupt files kept |")
    print("|---|---|---|---|---|---|---|---|")
    rates = {}
    for (faults, name), rs in runs.items():
        r = dict(sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2], peak_mb=max(r["peak_mb"] for r in rs))
        rates[faults, name] = round(r["servable"] / r["seconds"], 1)
        print(f"| {'clean' if faults == 'none' else 'faults'} | {name} | {r.get('processes', 1)} | "
              f"{rates[faults, name]:.1f} | "
              f"{r['mb'] / r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['intact']}/{r['servable']} | "
              f"{r['corrupt_kept']} |")
    print()
    for faults in ("none", "realistic"):
        mine, loop = rates[faults, "fathompipe"], rates[faults, "straightforward loop"]
        print(f"{'clean' if faults == 'none' else 'faults'} server: fathompipe {mine / loop:.2f}x the straightforward "
              f"loop's images/s ({mine:.1f} / {loop:.1f})")


if __name__ == "__main__":
    main()
