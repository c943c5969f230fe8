"""The README's first command: the offline demo runs every stage and ends with a report."""
import json
import subprocess
import sys

from conftest import ROOT


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m demo` from the repository root, where the demo lives (it is not in the installed package)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_demo_end_to_end_then_rerun_resumes(fiftyone_db, tmp_path):
    proc = cli("demo", "--run-dir", str(tmp_path / "demo"), "--faults")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("download", "checkpoint", "infer", "evaluate"):
        assert f"{stage}: done" in out
    assert "report:" in out and "mean hierarchical distance" in out
    assert "open it: python -m fathompipe.app --dataset fathompipe-demo --view eval_model_train-disagreements" in out
    done = json.loads((tmp_path / "demo/evaluate/train/evaluate.done").read_text())
    assert done["fiftyone"]["predictions"] == 86 and done["fiftyone"]["saved_view"] == "eval_model_train-disagreements"
    metrics = json.loads((tmp_path / "demo/evaluate/train/metrics.json").read_text())
    assert metrics["n_annotations"] == 86 and metrics["n_missing_predictions"] == 0
    again = cli("demo", "--run-dir", str(tmp_path / "demo"))
    assert again.returncode == 0 and "resuming" in again.stdout and "evaluate: nothing to do" in again.stdout
