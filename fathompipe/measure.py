"""Time and peak memory of a stage's parts: logged as they finish and kept in the stage's completion marker, so a
user sizing a job for a larger deployment reads them off their own run (and bench/scale.py reads them too).

The peak is the process's resident set high-water mark (VmHWM), reset at the start of each part through
/proc/self/clear_refs (Linux); where that is not available only the time is kept.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

STATUS = Path("/proc/self/status")


def peak_rss() -> Optional[int]:
    """This process's peak resident set since the last reset, in bytes (None off Linux)."""
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Parts:
    """Per part: seconds, peak GB and when it ran (wall clock), in the order the parts ran."""

    def __init__(self, label: str):
        self.label = label
        self.parts: Dict[str, Dict[str, float]] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        reset_peak()
        start, t0 = time.time(), time.monotonic()
        yield
        seconds, peak = time.monotonic() - t0, peak_rss()
        self.parts[name] = {"seconds": round(seconds, 2), "started": start, "ended": time.time(),
                            **({"peak_gb": round(peak / 2**30, 3)} if peak is not None else {})}
        print(f"{self.label}: {name} in {seconds:.1f}s" + (f", peak {peak / 2**30:.2f} GB" if peak else ""),
              flush=True)
