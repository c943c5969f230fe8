"""The same stage graph through submitit's local executor (the embedded default, no Slurm)."""
from conftest import PARITY
from fathompipe.fakeserver import Faults
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
    assert st["next"] == "all stages complete"
    assert {s["stage"]: s["items"] for s in st["stages"]}["download"] == {"ok": 12, "missing": 0, "failed": 0}

    requests = sum(server.requests.values())
    again = cli("submit", "--profile", str(profile))
    assert again.returncode == 0 and "resuming" in again.stdout and "infer: nothing to do" in again.stdout
    assert sum(server.requests.values()) == requests


def test_changed_config_into_same_run_dir_is_refused(tmp_path, fake_fathomnet, parity_copy):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "local")
    assert cli("submit", "--profile", str(profile), "download.num_shards=1").returncode == 0
    proc = cli("submit", "--profile", str(profile), "download.num_shards=2")
    assert proc.returncode == 1
    assert "download.num_shards: 1 in the run, 2 now" in proc.stderr and "new --run-dir" in proc.stderr


def test_damaged_run_json_is_a_clear_error_and_submits_nothing(tmp_path, fake_fathomnet, parity_copy):
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "local")
    assert cli("submit", "--profile", str(profile), "data.splits=[test]").returncode == 0
    run_json = tmp_path / "run" / "run.json"
    run_json.write_text('{"cluster": "local", "stag')
    proc = cli("submit", "--profile", str(profile))
    assert proc.returncode == 1 and "run.json is corrupt" in proc.stderr and "Nothing was submitted" in proc.stderr
    assert cli("status", "--run-dir", str(tmp_path / "run")).returncode == 1
    run_json.unlink()
    proc = cli("submit", "--profile", str(profile))
    assert proc.returncode == 1 and "run.json is missing" in proc.stderr and "squeue" in proc.stderr


def test_unreachable_database_then_resubmit(fiftyone_db, tmp_path, fake_fathomnet, parity_copy):
    """Drill: the FiftyOne database is down when the evaluate job starts."""
    from fathompipe.mongod import PrivateMongod

    down = PrivateMongod()
    port = down.port
    down.stop()  # the database the profile names is now unreachable
    server, ann = fake_fathomnet(PARITY / "dataset.json", Faults(), source_dir=PARITY / "images")
    profile = write_profile(tmp_path, ann, parity_copy, "local")
    uri = f"mongodb://127.0.0.1:{port}"
    proc = cli("submit", "--profile", str(profile), f"evaluate.database_uri={uri}")
    assert proc.returncode == 1 and "infer: done" in proc.stdout and "unfinished: evaluate test" in proc.stderr
    run_dir = tmp_path / "run"
    st = status_json(run_dir)
    evaluate = {s["stage"]: s for s in st["stages"]}["evaluate"]
    assert evaluate["failed"] == 1 and f"cannot reach the MongoDB at {uri}" in evaluate["failures"][0]["last_line"]
    assert "fathompipe.resubmit" in st["next"]
    assert (run_dir / "evaluate/test/report.html").exists()  # the report did not wait for the database

    up = PrivateMongod(port=port)  # the database is back
    try:
        infer_parts = {p: p.stat().st_mtime_ns for p in (run_dir / "infer/test/predictions.parts").glob("*.npz")}
        proc = cli("resubmit", "--run-dir", str(run_dir))
        assert proc.returncode == 0, proc.stderr
        assert "infer: nothing to do" in proc.stdout and "evaluate: done" in proc.stdout
        assert status_json(run_dir)["next"] == "all stages complete"
        assert {p: p.stat().st_mtime_ns for p in infer_parts} == infer_parts  # nothing redone
    finally:
        up.stop()
