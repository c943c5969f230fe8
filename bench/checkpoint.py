"""Checkpoint stage at full size: time and memory of verifying a 16 GB Lightning checkpoint and
exporting its slim inference file, then the time to load that file.

    python bench/checkpoint.py [--workdir DIR] [--keep]

The real checkpoint (Google Drive) is not reachable here, so the benchmark writes a stand-in of the
same size and layout: the winner's architecture at full size (four DINOv2-large encoders, attention
blocks, classifier: about 1.35e9 parameters, random), an AdamW state of two tensors per parameter,
hyper-parameters as the winner's code stores them, written by torch.save like Lightning does. The
stage runs in its own process; its resident memory is sampled every 50 ms and split into anonymous
memory (what the stage allocates) and file-backed pages (the memory-mapped checkpoint, which the
kernel can drop at any time).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Union

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from infer import full_spec, random_model  # noqa: E402  (bench/infer.py: the full-size architecture)


def write_stand_in(path: Path) -> int:
    """A Lightning-layout checkpoint of the real one's size; returns its size in bytes."""
    spec = full_spec()
    model = random_model(spec, torch.device("cpu"))
    from fathompipe.model.winner import to_checkpoint_name
    state = {to_checkpoint_name(k): v for k, v in model.state_dict().items()}
    adam = {i: {"step": torch.tensor(1000.0), "exp_avg": torch.empty_like(v), "exp_avg_sq": torch.empty_like(v)}
            for i, v in enumerate(state.values())}
    ckpt = {
        "epoch": 14, "global_step": 1000, "pytorch-lightning_version": "2.5.1",
        "state_dict": state,
        "optimizer_states": [{"state": adam, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05,
                                                                "params": list(range(len(state)))}]}],
        "hyper_parameters": {"category_id2name": dict(enumerate(spec.class_names)), "obj_encoder_size": [256, 256],
                             "env_img_crop_scale_list": [3, 5, -1]},
    }
    torch.save(ckpt, path)
    return path.stat().st_size


def run_sampled(cmd: list) -> Dict[str, Union[float, str]]:
    """Run `cmd`; wall time and the peaks of its anonymous and file-backed resident memory (GB)."""
    peaks = {"anon": 0.0, "file": 0.0, "total": 0.0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            except (OSError, ValueError):
                break
            anon = int(fields.get("RssAnon", "0 kB").split()[0]) / 1e6
            file = int(fields.get("RssFile", "0 kB").split()[0]) / 1e6
            peaks.update(anon=max(peaks["anon"], anon), file=max(peaks["file"], file),
                         total=max(peaks["total"], anon + file))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    return {**peaks, "seconds": time.perf_counter() - t0, "last_line": out.strip().splitlines()[-1]}


LOAD = """
import sys, time
t0 = time.perf_counter()
from fathompipe.model.weights import load_model
from fathompipe.layout import SlimFiles
from pathlib import Path
t1 = time.perf_counter()
model, spec = load_model(SlimFiles.beside(Path(sys.argv[1])))
t2 = time.perf_counter()
for p in model.parameters():  # read one float per 4 KiB page: every page of the weights comes in
    p.view(-1)[::1024].sum()
print(f"imports {t1 - t0:.1f} s, load {t2 - t1:.1f} s, "
      f"first touch of every weight page {time.perf_counter() - t2:.1f} s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fathompipe-bench-checkpoint"))
    parser.add_argument("--keep", action="store_true", help="keep the 16 GB stand-in (reused next time)")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "last-002.ckpt"
    if not ckpt.exists():
        t0 = time.perf_counter()
        size = write_stand_in(ckpt)
        print(f"wrote the stand-in: {size / 1e9:.1f} GB in {time.perf_counter() - t0:.0f}s", flush=True)
    for stale in work.glob("last-002.inference.*"):
        stale.unlink()
    stage = run_sampled([sys.executable, "-m", "fathompipe.checkpoint", "--checkpoint", str(ckpt)])
    slim = sum(p.stat().st_size for p in work.glob("last-002.inference.*"))
    reuse = run_sampled([sys.executable, "-m", "fathompipe.checkpoint", "--checkpoint", str(ckpt)])
    load = run_sampled([sys.executable, "-c", LOAD, str(ckpt)])
    print(f"\n## bench/checkpoint.py: {ckpt.stat().st_size / 1e9:.1f} GB stand-in checkpoint, "
          f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM\n")
    print("| step | wall s | peak anonymous GB | peak file-backed GB |")
    print("|---|---|---|---|")
    print(f"| checkpoint stage: verify + export {slim / 1e9:.1f} GB slim file | {stage['seconds']:.1f} | "
          f"{stage['anon']:.2f} | {stage['file']:.2f} |")
    print(f"| checkpoint stage again (slim file current) | {reuse['seconds']:.1f} | {reuse['anon']:.2f} | "
          f"{reuse['file']:.2f} |")
    print(f"| load the slim model in a new process | {load['seconds']:.1f} | {load['anon']:.2f} | {load['file']:.2f} |")
    print(f"\nslim load, in that process: {load['last_line']}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
