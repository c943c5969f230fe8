"""submit, resubmit, status and cancel end to end against a recorded Slurm (tests/fakeslurm.py), in seconds.

The commands run as a user runs them (their `main`), through submitit's real SlurmExecutor; only sbatch, sacct,
squeue and scancel are the recorded stand-ins, and each job's work is its completion marker or failure records,
written by the test. The same flows run on the real Slurm in test_pipeline_slurm.py, test_recovery_slurm.py and
test_drills_slurm.py.
"""
from __future__ import annotations

import json
import pickle
import shlex
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import PARITY
from fakeslurm import FakeSlurm, Refusal
from fathompipe import cancel, resubmit, status, submit
from fathompipe.fetch.records import ImageRecord
from fathompipe.layout import RunPaths, SlimFiles, evaluate_marker
from fathompipe.model.slim import fingerprint, write_meta
from fathompipe.pipeline.scheduler import log_paths
from test_driver_logic import SBATCH_PARTITION, SBATCH_QOS_LIMIT

SHARDS = 3


@pytest.fixture
def slurm_fake(tmp_path, monkeypatch) -> FakeSlurm:
    return FakeSlurm(tmp_path / "slurm").install(monkeypatch)


def write_profile(tmp_path: Path, name: str = "run", **infer_resources: object) -> Path:
    profile = {
        "run_dir": str(tmp_path / name),
        "cluster": "slurm",
        "data": {"splits": ["test"], "test": {"annotations": str(PARITY / "dataset.json"),
                                              "images_dir": str(tmp_path / "images")}},
        "download": {"num_shards": SHARDS, "max_attempts": 8},
        "checkpoint": {"path": str(tmp_path / "ckpt" / "model.ckpt")},
        "infer": {"resources": {"partition": "gpu", "gpus_per_node": 1, **infer_resources}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(profile))  # JSON is YAML
    return path


class Run:
    """One run directory: its jobs as run.json records them, and the work a job leaves behind."""

    def __init__(self, root: Path, fake: FakeSlurm) -> None:
        self.root, self.fake, self.paths = root, fake, RunPaths.of(root)

    def state(self) -> Dict:
        return json.loads(self.paths.run_json.read_text())

    def job(self, stage: str, key: str) -> str:
        return [s["tasks"][key] for s in self.state()["stages"][stage]["submissions"] if key in s["tasks"]][-1]

    def _log(self, stage: str, job: str, text: str) -> None:
        for path in log_paths(self.paths.logs(stage), job).values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def download(self, shard: int, error: str = "") -> None:
        """Shard `shard` ends: complete, or every image failed with `error` after 8 attempts."""
        files = self.paths.shard_files("test", shard, SHARDS)
        files.state_dir.mkdir(parents=True, exist_ok=True)
        job = self.job("download", f"test/{shard}")
        if error:
            rec = ImageRecord(shard + 1, str(self.root / "x.png"), "failed", attempts=8, error=error)
            files.records.write_text(json.dumps(rec.__dict__) + "\n")
            self._log("download", job, f"fathompipe.pipeline.graph.StageFailed: shard {files.key}: INCOMPLETE; "
                                       f"causes: {error} x1\n")
            self.fake.finish(job, "FAILED")
        else:
            files.marker.write_text("{}")
            self._log("download", job, "done\n")
            self.fake.finish(job)

    def checkpoint(self) -> None:
        """The slim weights exist and are current (what the checkpoint job leaves, or a previous run)."""
        ckpt = self.root.parent / "ckpt" / "model.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"checkpoint")
        slim = SlimFiles.beside(ckpt)
        slim.weights.write_bytes(b"weights")
        write_meta(slim, {"source": fingerprint(ckpt), "encoder_config": {}})

    def infer(self) -> None:
        out = self.paths.predictions("test")
        out.parts.mkdir(parents=True, exist_ok=True)
        out.csv.write_text("annotation_id,concept_name\n")
        out.shard_marker(0, 1).write_text("{}")

    def report(self, fiftyone: bool = True) -> Path:
        """The evaluate job's report; with `fiftyone` its completion marker too (the import went through)."""
        out = self.paths.report_dir("test")
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.html").write_text("<html></html>")
        if fiftyone:
            evaluate_marker(out).write_text(json.dumps({"report": str(out / "report.html"), "headline": "h",
                                                        "fiftyone": {"dataset": "fathomnet-2025"}}))
        return out / "report.html"

    def finish(self, stage: str, key: str, state: str = "COMPLETED", log: str = "done\n") -> None:
        job = self.job(stage, key)
        self._log(stage, job, log)
        self.fake.finish(job, state)


def status_of(run: Run, capsys) -> Dict:
    capsys.readouterr()
    status.main(["--run-dir", str(run.root), "--json"])
    return json.loads(capsys.readouterr().out)


def stages_of(st: Dict) -> Dict[str, Dict]:
    return {s["stage"]: s for s in st["stages"]}


def run_copied(command: str, fake: FakeSlurm, cwd: Path) -> subprocess.CompletedProcess:
    """The command as a user pastes it into a shell, from another directory."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=fake.env(), capture_output=True, text=True,
                          timeout=120)


def test_submit_queues_the_graph_with_dependencies(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path)
    assert submit.main(["--profile", str(profile)]) == 0
    out = capsys.readouterr().out
    assert f"download: submitted {SHARDS} task(s)" in out and "watch: " in out
    run = Run(tmp_path / "run", slurm_fake)
    jobs = slurm_fake.jobs()
    (download,), (ckpt,), (infer,), (evaluate,) = (slurm_fake.of_stage(s) for s in
                                                   ("download", "checkpoint", "infer", "evaluate"))
    assert jobs[infer]["dependency"] == f"afterok:{download}:{ckpt}"
    assert jobs[evaluate]["dependency"] == f"afterok:{infer}"
    assert all(j["comment"] == f"fathompipe:{run.paths.root}" for j in jobs.values())
    st = stages_of(status_of(run, capsys))
    assert [st[s]["pending"] for s in ("download", "checkpoint", "infer", "evaluate")] == [SHARDS, 1, 1, 1]


def test_status_after_403s_says_fix_access_first(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path)
    assert submit.main(["--profile", str(profile)]) == 0
    run = Run(tmp_path / "run", slurm_fake)
    run.download(0)
    run.download(1, error="HTTP 403")
    run.download(2)
    run.checkpoint()
    run.finish("checkpoint", "checkpoint")
    run.finish("infer", "test/0", "CANCELLED", log="")  # kill-on-invalid-dep
    run.finish("evaluate", "test", "CANCELLED", log="")
    capsys.readouterr()
    st = status_of(run, capsys)
    assert "fix access" in st["next"].lower() and "HTTP 403" in st["next"]
    assert st["command"] in st["next"] and "fathompipe.resubmit" in st["command"]

    # access fixed: the command, as copied, resubmits the shard and re-chains what waits on it
    proc = run_copied(st["command"], slurm_fake, tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "download: submitted 1 task(s)" in proc.stdout and "checkpoint: nothing to do" in proc.stdout
    new_download = slurm_fake.of_stage("download")[-1]
    assert slurm_fake.jobs()[slurm_fake.of_stage("infer")[-1]]["dependency"] == f"afterok:{new_download}"


def test_status_after_a_refused_stage_gives_the_submit_command(slurm_fake, tmp_path, capsys, monkeypatch):
    # the per-user job limit refuses the infer job at submission, not at sbatch --test-only
    profile = write_profile(tmp_path, qos="limited")
    slurm_fake.refuse(Refusal("#SBATCH --qos=limited", SBATCH_QOS_LIMIT))
    monkeypatch.chdir(tmp_path)
    assert submit.main(["--profile", profile.name]) == 1  # a profile path relative to where the user is
    captured = capsys.readouterr()
    assert "infer: not submitted" in captured.out
    run = Run(tmp_path / "run", slurm_fake)
    monkeypatch.chdir(tmp_path / "slurm")  # status from another directory
    st = status_of(run, capsys)
    assert st["command"].startswith(f"cd {tmp_path} && ") and "fathompipe.submit" in st["command"]
    assert st["command"].endswith(f"--profile {profile.name}")
    assert "infer.resources.qos" in st["next"] and str(profile) in st["next"] and st["command"] in st["next"]

    profile.write_text(profile.read_text().replace('"limited"', '"normal"'))  # the fix
    proc = run_copied(st["command"], slurm_fake, tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "infer: submitted 1 task(s)" in proc.stdout and "evaluate: submitted 1 task(s)" in proc.stdout
    assert len(slurm_fake.of_stage("download")) == 1  # queued work is never submitted twice


def test_sbatch_refusal_prints_only_fathompipes_message(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path, qos="limited")
    slurm_fake.refuse(Refusal("#SBATCH --qos=limited", SBATCH_QOS_LIMIT))
    assert submit.main(["--profile", str(profile)]) == 1
    captured = capsys.readouterr()
    assert "sbatch: error" not in captured.out + captured.err
    assert "QOSMaxSubmitJobPerUserLimit" in captured.out  # Slurm's reason, once, in fathompipe's line


def finished_run(tmp_path: Path, fake: FakeSlurm, capsys) -> Run:
    profile = write_profile(tmp_path)
    assert submit.main(["--profile", str(profile)]) == 0
    run = Run(tmp_path / "run", fake)
    for shard in range(SHARDS):
        run.download(shard)
    run.checkpoint()
    run.finish("checkpoint", "checkpoint")
    run.infer()
    run.finish("infer", "test/0")
    run.report()
    run.finish("evaluate", "test")
    return run


def test_status_after_a_finished_run(slurm_fake, tmp_path, capsys):
    run = finished_run(tmp_path, slurm_fake, capsys)
    st = status_of(run, capsys)
    assert st["next"].startswith("all stages complete")
    assert str(run.paths.report_dir("test") / "report.html") in st["next"]
    from fathompipe.pipeline.commands import python  # here: the module is new (its tests run on older code too)
    assert st["command"].startswith(f"{shlex.quote(python())} -") and "fathomnet-2025" in st["command"]  # the App
    assert st["command"] in st["next"]


def test_elapsed_stops_when_the_run_ends(slurm_fake, tmp_path, capsys, monkeypatch):
    run = finished_run(tmp_path, slurm_fake, capsys)
    elapsed = [s["elapsed_s"] for s in status_of(run, capsys)["stages"]]
    later = time.time() + 360
    monkeypatch.setattr(time, "time", lambda: later)  # six minutes later, nothing changed
    assert [s["elapsed_s"] for s in status_of(run, capsys)["stages"]] == elapsed


def test_cells_count_unfinished_tasks_only(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path)
    run = Run(tmp_path / "run", slurm_fake)
    run.checkpoint()  # finished before the run: never submitted
    assert submit.main(["--profile", str(profile)]) == 0
    assert "checkpoint: nothing to do" in capsys.readouterr().out
    run.download(0)
    run.paths.shard_files("test", 1, SHARDS).marker.write_text("{}")  # shard 1's work is done, its job exiting
    slurm_fake.finish(run.job("download", "test/1"), "RUNNING")
    st = stages_of(status_of(run, capsys))
    assert st["download"]["running"] == 0 and st["download"]["states"] == {"PENDING": 1}
    assert st["checkpoint"]["done"] == 1 and st["checkpoint"]["states"] == {}
    capsys.readouterr()
    status.main(["--run-dir", str(run.root)])
    table = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:6]}
    assert table["download"][2] == "PENDING:1" and table["checkpoint"][2] == "-"


def test_report_counted_when_the_fiftyone_import_failed(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path)
    assert submit.main(["--profile", str(profile)]) == 0
    run = Run(tmp_path / "run", slurm_fake)
    run.report(fiftyone=False)
    run.finish("evaluate", "test", "FAILED", log="FiftyOneSetupError: cannot reach the MongoDB at x\n")
    ev = stages_of(status_of(run, capsys))["evaluate"]
    assert ev["items"] == {"reports": 1} and ev["done"] == 0 and ev["failed"] == 1


def test_resubmit_overrides_start_from_the_runs_configuration(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path)
    assert submit.main(["--profile", str(profile)]) == 0
    run = Run(tmp_path / "run", slurm_fake)
    run.download(0, error="HTTP 503")
    capsys.readouterr()
    code = resubmit.main(["--run-dir", str(run.root), "download.resources.mem_gb=1"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "resources changed for work not yet done: download.resources.mem_gb" in captured.out
    assert slurm_fake.jobs()[slurm_fake.of_stage("download")[-1]]["mem"] == "1024M"


def test_resubmit_retry_command_survives_spaces(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path, name="my run")
    assert submit.main(["--profile", str(profile)]) == 0
    run = Run(tmp_path / "my run", slurm_fake)
    run.download(0, error="HTTP 503")
    slurm_fake.refuse(Refusal("/logs/download/", SBATCH_QOS_LIMIT))
    capsys.readouterr()
    assert resubmit.main(["--run-dir", str(run.root)]) == 1
    err = capsys.readouterr().err
    command = err.rsplit("complete the run with: ", 1)[1].strip()
    words = shlex.split(command)
    assert words[words.index("fathompipe.resubmit") + 1:] == ["--run-dir", str(run.root)]
    slurm_fake.allow_all()
    proc = run_copied(command, slurm_fake, tmp_path / "elsewhere")
    assert proc.returncode == 0 and "download: submitted 1 task(s)" in proc.stdout, proc.stdout + proc.stderr


def submitted_task(run: Run, stage: str, job: str) -> object:
    with open(run.paths.logs(stage) / f"{job}_submitted.pkl", "rb") as fh:
        return pickle.load(fh).function


def test_resubmit_rebuilds_the_job_submit_built(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path)
    uri = "mongodb://db.example:27017/?replicaSet=rs0"
    assert submit.main(["--profile", str(profile), f"evaluate.database_uri={uri}"]) == 0
    run = Run(tmp_path / "run", slurm_fake)
    first = run.job("evaluate", "test")
    for shard in range(SHARDS):
        run.download(shard)
    run.checkpoint()
    run.finish("checkpoint", "checkpoint")
    run.infer()
    run.finish("infer", "test/0")
    run.finish("evaluate", "test", "FAILED", log="FiftyOneSetupError: cannot reach the MongoDB\n")
    assert resubmit.main(["--run-dir", str(run.root)]) == 0
    again = run.job("evaluate", "test")
    assert again != first
    assert submitted_task(run, "evaluate", again) == submitted_task(run, "evaluate", first)
    assert submitted_task(run, "evaluate", again).job.options.database_uri == uri


def test_database_password_in_the_configuration_is_refused(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path)
    uri = "mongodb://alice:s3cret@db.example:27017/"
    assert submit.main(["--profile", str(profile), f"evaluate.database_uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.database_uri" in err and "FIFTYONE_DATABASE_URI" in err and ".env" in err
    assert "s3cret" not in err and not (tmp_path / "run" / "run.json").exists() and slurm_fake.jobs() == {}


@pytest.mark.parametrize("where", ["command line", "profile"])
def test_preflight_names_where_the_bad_value_was_set(slurm_fake, tmp_path, capsys, where):
    slurm_fake.refuse(Refusal("#SBATCH --partition=bogus", SBATCH_PARTITION.replace("gpu-rtx6000", "bogus"),
                              test_only=True))
    if where == "profile":
        profile = write_profile(tmp_path, partition="bogus")
        args = ["--profile", str(profile)]
    else:
        profile = write_profile(tmp_path)
        args = ["--profile", str(profile), "infer.resources.partition=bogus"]
    assert submit.main(args) == 1
    err = capsys.readouterr().err
    assert "stage infer: Slurm refuses its job: invalid partition specified: bogus" in err
    if where == "profile":
        assert f"Change infer.resources.partition in {profile}" in err
    else:
        assert "Change infer.resources.partition on the command line (infer.resources.partition=bogus)" in err
        assert str(profile) not in err
    assert slurm_fake.jobs() == {}


def test_squeue_name_tells_two_runs_stages_apart(slurm_fake, tmp_path, capsys):
    for name in ("alpha", "bravo"):
        assert submit.main(["--profile", str(write_profile(tmp_path, name=name))]) == 0
    out = subprocess.run(["squeue", "-h", "-r", "-u", "me", "-o", "%j"], capture_output=True, text=True,
                         env=slurm_fake.env()).stdout
    short: List[str] = sorted({name[:8] for name in out.split()})  # squeue's default NAME column
    assert len(short) == 8, short  # 4 stages x 2 runs
    assert {s.split(".")[1] for s in short} == {"alpha", "bravo"}


def test_cancel_then_resubmit(slurm_fake, tmp_path, capsys):
    profile = write_profile(tmp_path)
    assert submit.main(["--profile", str(profile)]) == 0
    run = Run(tmp_path / "run", slurm_fake)
    run.download(0)
    slurm_fake.finish(run.job("download", "test/1"), "RUNNING")
    assert cancel.main(["--run-dir", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert "cancelled 5 job(s)" in out and "fathompipe.resubmit" in out
    st = status_of(run, capsys)
    assert stages_of(st)["download"]["cancelled"] == 2 and "fathompipe.resubmit" in st["command"]
    proc = run_copied(st["command"], slurm_fake, tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "download: submitted 2 task(s)" in proc.stdout and "infer: submitted 1 task(s)" in proc.stdout


def test_a_stage_larger_than_maxarraysize_goes_in_several_arrays(slurm_fake, tmp_path, capsys, monkeypatch):
    """Slurm refuses an array past MaxArraySize (1,001 by default: 2 splits x 1,000 shards exceed it): the stage is
    submitted as several arrays, every one recorded, and the next stage waits for all of them."""
    from fathompipe.pipeline import scheduler

    monkeypatch.setattr(scheduler, "max_array_size", lambda: 2)
    assert submit.main(["--profile", str(write_profile(tmp_path))]) == 0
    downloads = slurm_fake.of_stage("download")
    assert len(downloads) == 2 and "submitted 3 task(s) as job " + ", ".join(downloads) in capsys.readouterr().out
    (ckpt,), (infer,) = slurm_fake.of_stage("checkpoint"), slurm_fake.of_stage("infer")
    assert slurm_fake.jobs()[infer]["dependency"] == f"afterok:{':'.join(sorted([*downloads, ckpt], key=int))}"
    run = Run(tmp_path / "run", slurm_fake)
    assert [s["job_id"] for s in run.state()["stages"]["download"]["submissions"]] == list(downloads)
    assert stages_of(status_of(run, capsys))["download"]["pending"] == SHARDS


def test_a_second_submit_into_a_run_being_submitted_touches_nothing(slurm_fake, tmp_path, capsys):
    """The annotation tables are cut under the run's lock: while another command submits into the run, a second
    submit is refused before it reads or writes anything there (no table swapped under queued jobs)."""
    import fcntl

    profile = write_profile(tmp_path)
    paths = RunPaths.of(tmp_path / "run")
    paths.root.mkdir(parents=True)
    with open(paths.lock, "w") as held:  # the other command
        fcntl.flock(held, fcntl.LOCK_EX)
        assert submit.main(["--profile", str(profile)]) == 1
    assert "another fathompipe command is submitting into" in capsys.readouterr().err
    assert not paths.annotation_table("test").exists() and slurm_fake.jobs() == {}
    assert submit.main(["--profile", str(profile)]) == 0 and paths.annotation_table("test").exists()


def test_a_run_dir_that_cannot_be_made_is_one_line(slurm_fake, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    profile = write_profile(tmp_path)
    assert submit.main(["--profile", str(profile), f"run_dir={tmp_path / 'afile' / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "choose a run_dir you can write to" in err
    assert "Traceback" not in err
    assert slurm_fake.jobs() == {}
