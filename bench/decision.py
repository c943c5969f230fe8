"""The expected-distance rule at scale: time and peak memory of decision.decide over N ROIs of float32 logits
held in a memory-mapped file (one of the sources decide reads in blocks; the evaluate stage hands it the
parquet's logits a row group at a time), per block size, beside the unchunked computation (one float64 softmax
and product over all rows) on the same data.

    .venv/bin/python bench/decision.py [--rows 2000000]

Peak memory is what numpy allocated during the call (tracemalloc; the memory map's pages are the OS's page cache,
not counted). Prints one table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from fathompipe.evaluation import decision
from fathompipe.evaluation.taxonomy import load_taxonomy


def measure(fn) -> tuple:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak


def unchunked(logits: np.ndarray, names) -> np.ndarray:
    """The naive way: all rows at once in float64."""
    return (decision.softmax(logits) @ decision.distance_matrix(names)).argmin(axis=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    names = list(load_taxonomy())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "logits.f32"
        mapped = np.lib.format.open_memmap(path, "w+", np.float32, (args.rows, len(names)))
        rng = np.random.default_rng(0)
        for start in range(0, args.rows, 262_144):
            block = rng.normal(0, 2, (min(262_144, args.rows - start), len(names))).astype(np.float32)
            mapped[start:start + len(block)] = block
        mapped.flush()
        logits = np.load(path, mmap_mode="r")
        print(f"{args.rows:,} ROIs x {len(names)} float32 logits in a memory map ({logits.nbytes / 1e6:,.0f} MB)")
        print(f"{'method':<28}{'seconds':>10}{'peak MB':>10}{'ROIs/s':>14}")
        reference = None
        for rows in (16_384, 65_536, 262_144):
            made, seconds, peak = measure(lambda: decision.decide(logits, names, rows=rows))
            reference = made.rule if reference is None else reference
            assert np.array_equal(made.rule, reference)
            print(f"{'decide, blocks of ' + format(rows, ','):<28}{seconds:>10.1f}{peak / 1e6:>10.0f}"
                  f"{args.rows / seconds:>14,.0f}")
        rule, seconds, peak = measure(lambda: unchunked(np.asarray(logits), names))
        print(f"{'unchunked float64':<28}{seconds:>10.1f}{peak / 1e6:>10.0f}{args.rows / seconds:>14,.0f}")
        print(f"(same rule as decide except ties: {int((rule != reference).sum())} rows differ)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
