"""device: auto on a job that was given a GPU but sees no CUDA says so, in the job's log."""
import subprocess
import sys

import pytest
import torch

from fathompipe.infer import resolve_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_gpu_granted_but_cuda_unavailable_warns(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_STEP_GPUS", raising=False)
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    assert resolve_device("auto").type == "cpu"
    err = capsys.readouterr().err
    assert "warning: this job was given a GPU (SLURM_JOB_GPUS=0) but CUDA is unavailable" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_no_gpu_granted_no_warning(monkeypatch, capsys):
    for var in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    assert resolve_device("auto").type == "cpu"
    assert capsys.readouterr().err == ""


def test_a_gpu_job_on_the_test_cluster_warns(slurm, tmp_path):
    """The real thing: a job given the test cluster's stand-in GPU, with no CUDA behind it."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(["srun", "--partition=gpu", "--gpus-per-node=1", "--mem=1G", "-t", "5", sys.executable, "-c",
                           "from fathompipe.infer import resolve_device; print(resolve_device('auto'))"],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path.parent))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cpu" and "was given a GPU" in proc.stderr
