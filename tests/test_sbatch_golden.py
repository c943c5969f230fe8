"""sbatch rendering is a pure function; its output is pinned by golden records."""
from pathlib import Path

from fathompipe.config import Resources
from fathompipe.pipeline.graph import job_name
from fathompipe.pipeline.scheduler import expand_job_id, render_sbatch

GOLDEN = Path(__file__).parent / "golden"
RUN = Path("/scratch/runs/fathomnet2025")


def test_download_array_matches_golden():
    r = Resources(account="paceship-dsgt_clef2026", qos="inferno", cpus_per_task=2, mem_gb=2, timeout_min=120,
                  array_parallelism=8)
    text = render_sbatch(r, job_name(RUN, "download"), RUN / "logs/download", 64, python="/opt/venv/bin/python")
    assert text == (GOLDEN / "download.sbatch").read_text()
    assert "#SBATCH --array=0-63%8" in text and "%A_%a_0_log.err" in text
    assert "#SBATCH --job-name=dl.fathomnet2025" in text  # squeue's 8-character NAME: dl.fatho


def test_dependent_gpu_job_matches_golden():
    r = Resources(partition="gpu-rtx6000", account="paceship-dsgt_clef2026", qos="inferno", cpus_per_task=8,
                  mem_gb=48, timeout_min=120, gpus_per_node=1)
    text = render_sbatch(r, job_name(RUN, "infer"), RUN / "logs/infer", 1, "afterok:1001:1002",
                         python="/opt/venv/bin/python")
    assert text == (GOLDEN / "infer.sbatch").read_text()
    assert "--kill-on-invalid-dep=yes" in text  # a failed dependency cancels, never strands, the job


def test_pending_array_ids_expand():
    assert expand_job_id("12_[0-2,5%4]") == ["12_0", "12_1", "12_2", "12_5"]
    assert expand_job_id("12_3") == ["12_3"] and expand_job_id("12") == ["12"]
