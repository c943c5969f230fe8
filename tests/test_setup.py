"""setup.sh's choices, tested without installing: the torch build it selects, the Python it refuses,
and the GPU check's verdict on recorded nvidia-smi output (plus the real check on this node)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import ROOT
from fathompipe.cudacheck import parse_nvidia_smi, query_driver, verdict

NVIDIA_SMI_BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.183.06             Driver Version: 535.183.06     CUDA Version: 12.2     |
|-----------------------------------------+------------------------+----------------------+
"""


def torch_index(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA", "TORCH_INDEX_URL")}
    return subprocess.run(["bash", str(ROOT / "setup.sh"), "--torch-index"], capture_output=True, text=True,
                          env={**clean, **env}, timeout=30)


@pytest.mark.parametrize("env, selected", [
    ({}, "default torch==2.13.0"),
    ({"TORCH_CUDA": "cu121"}, "https://download.pytorch.org/whl/cu121 torch==2.13.0+cu121"),
    ({"TORCH_CUDA": "cpu"}, "https://download.pytorch.org/whl/cpu torch==2.13.0+cpu"),
    ({"TORCH_INDEX_URL": "https://mirror.example/whl/cu118", "TORCH_CUDA": "cu121"},
     "https://mirror.example/whl/cu118 torch==2.13.0"),
])
def test_setup_selects_the_torch_build(env, selected):
    proc = torch_index(**env)
    assert proc.returncode == 0 and proc.stdout.strip() == selected, proc.stderr


def test_setup_refuses_a_cuda_version_that_is_not_a_build_name():
    proc = torch_index(TORCH_CUDA="12.1")
    assert proc.returncode == 1 and "TORCH_CUDA=12.1 is not a torch build name" in proc.stderr


def test_setup_refuses_an_old_python_and_says_how_to_get_one(tmp_path):
    shutil.copy(ROOT / "setup.sh", tmp_path / "setup.sh")  # a checkout without .venv
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\necho 3.9\n")  # answers the version query as RHEL 9's python3 would
    old.chmod(old.stat().st_mode | stat.S_IEXEC)
    proc = subprocess.run(["bash", "setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": str(old)})
    assert proc.returncode == 1 and "needs Python 3.11 or newer" in proc.stderr and "is 3.9" in proc.stderr
    assert "module spider python" in proc.stderr and "dnf install python3.11" in proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_cuda_check_names_the_driver_and_the_build_when_cuda_fails():
    driver = parse_nvidia_smi(NVIDIA_SMI_BANNER, "535.183.06\n535.183.06\n")
    assert driver is not None and (driver.version, driver.cuda, driver.gpus) == ("535.183.06", "12.2", 2)
    ok, message = verdict(driver, "2.13.0+cu128", "12.8", False, "The NVIDIA driver on your system is too old")
    assert not ok
    for part in ("driver 535.183.06", "CUDA up to 12.2", "torch 2.13.0+cu128 (built for CUDA 12.8)", "TORCH_CUDA="):
        assert part in message
    ok, message = verdict(driver, "2.13.0+cpu", None, False)
    assert not ok and "CPU-only" in message and "TORCH_CUDA=" in message
    assert verdict(driver, "2.13.0+cu121", "12.1", True)[0]
    assert verdict(None, "2.13.0+cpu", None, False)[0]  # a login node: nothing to check
    assert parse_nvidia_smi("NVIDIA-SMI has failed", "") is None


def test_cuda_check_runs_here():
    proc = subprocess.run([sys.executable, "-m", "fathompipe.cudacheck"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    import torch
    if torch.cuda.is_available():
        assert proc.returncode == 0 and "CUDA works" in proc.stdout
    elif query_driver() is None:
        assert proc.returncode == 0 and "no NVIDIA GPU on this node" in proc.stdout
    else:  # a GPU that this torch cannot use must fail the check
        assert proc.returncode == 1 and "TORCH_CUDA=" in proc.stderr
