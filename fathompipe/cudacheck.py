"""Does this node's GPU work with the installed torch build? Run on a GPU node after setup.sh.

    python -m fathompipe.cudacheck      # exit 1, naming the driver and the build, when a GPU is there but unusable

setup.sh runs it at its end: on a node without an NVIDIA GPU (a login node, this laptop) it only reports.
On PACE, run it once inside a GPU job (`srun ... .venv/bin/python -m fathompipe.cudacheck`) before the
first submit: a torch build newer than the driver fails there, not hours later in the inference job.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

SETUP_HINT = ("rerun setup.sh with the build your driver supports, e.g. `TORCH_CUDA=cu121 bash setup.sh` "
              "(the newest cuXYZ at or below the driver's CUDA version; see the README, 'Set-up')")


@dataclass(frozen=True)
class Driver:
    """What nvidia-smi says: the driver's version, the newest CUDA it runs, and the GPUs it sees."""

    version: str
    cuda: str
    gpus: int


def parse_nvidia_smi(header: str, gpu_lines: str) -> Optional[Driver]:
    """From `nvidia-smi` (its banner) and `nvidia-smi --query-gpu=driver_version --format=csv,noheader`."""
    lines = [ln.strip() for ln in gpu_lines.splitlines() if ln.strip()]
    if not lines:
        return None
    cuda = re.search(r"CUDA Version:\s*([0-9.]+)", header)
    return Driver(version=lines[0], cuda=cuda.group(1) if cuda else "unknown", gpus=len(lines))


def query_driver() -> Optional[Driver]:
    """None where there is no NVIDIA driver (no nvidia-smi, or it sees no GPU)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_nvidia_smi(header, gpus)


def verdict(driver: Optional[Driver], torch_version: str, torch_cuda: Optional[str], cuda_works: bool,
            error: str = "") -> tuple[bool, str]:
    """(ok, message): a GPU the driver sees must be usable by this torch build."""
    build = f"torch {torch_version} " + (f"(built for CUDA {torch_cuda})" if torch_cuda else "(CPU-only)")
    if cuda_works:
        return True, f"cudacheck: CUDA works: {build}" + (f", driver {driver.version}" if driver else "")
    if driver is None:
        return True, f"cudacheck: no NVIDIA GPU on this node; {build}. Run it again on a GPU node."
    seen = f"{driver.gpus} GPU(s), driver {driver.version} (runs CUDA up to {driver.cuda})"
    why = f": {error}" if error else ""
    if torch_cuda is None:
        return False, f"cudacheck: this node has {seen}, but {build} cannot use it; {SETUP_HINT}"
    return False, f"cudacheck: CUDA does not work{why}: {seen}, {build}; {SETUP_HINT}"


def main() -> int:
    import torch

    error = ""
    try:
        works = torch.cuda.is_available() and torch.zeros(1, device="cuda").add(1).item() == 1
    except RuntimeError as exc:  # a driver too old for the build raises here
        works, error = False, str(exc).splitlines()[0]
    ok, message = verdict(query_driver(), torch.__version__, torch.version.cuda, works, error)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
