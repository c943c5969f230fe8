"""The same stage graph through submitit's local executor (the embedded default, no Slurm)."""
import json

from conftest import PARITY
from fathompipe.annotation_table import read_meta
from support.fakeserver import Faults
from pipeline_helpers import EXPECTED_SUBMISSION, cli, status_json, write_profile


def test_local_executor_runs_the_graph_in_order(tmp_path, fake_fathomnet, parity_copy):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "local")
    proc = cli("submit", "--profile", str(profile))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.index("download: done") < out.index("checkpoint: done") < out.index("infer: done")
    run_dir = tmp_path / "run"
    assert (run_dir / "infer/test/predictions.csv").read_text() == EXPECTED_SUBMISSION.read_text()
    st = status_json(run_dir)
    assert st["next"].startswith("all stages complete") and str(run_dir / "evaluate/test/report.html") in st["next"]
    assert {s["stage"]: s["items"] for s in st["stages"]}["download"] == {"ok": 12, "missing": 0, "failed": 0}

    requests = sum(server.requests.values())
    again = cli("submit", "--profile", str(profile))
    assert again.returncode == 0 and "resuming" in again.stdout and "infer: nothing to do" in again.stdout
    assert sum(server.requests.values()) == requests

    # the annotation file was cut once into the run's table, which every task read; once the run has jobs, a
    # changed file is refused instead of re-cut into other shards
    assert read_meta(run_dir / "annotations" / "test")["num_shards"] == 3
    raw = json.loads(ann.read_text())
    raw["images"].pop()
    ann.write_text(json.dumps(raw))
    changed = cli("submit", "--profile", str(profile))
    assert changed.returncode == 1 and "is not the file this run's shards were cut from" in changed.stderr


def test_changed_config_into_same_run_dir_is_refused(tmp_path, fake_fathomnet, parity_copy):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "local")
    assert cli("submit", "--profile", str(profile), "--dry-run").returncode == 0
    assert not (tmp_path / "run" / "annotations").exists()  # a dry run checks the file and writes nothing
    assert cli("submit", "--profile", str(profile), "download.num_shards=1").returncode == 0
    proc = cli("submit", "--profile", str(profile), "download.num_shards=2")
    assert proc.returncode == 1
    assert "download.num_shards: 1 in the run, 2 now" in proc.stderr and "new --run-dir" in proc.stderr
