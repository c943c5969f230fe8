"""fathompipe's private database (fathompipe/evaluation/private_database.py): FiftyOne's mongod on FiftyOne's data
directory, listening only on a Unix socket in a 0700 directory, one per data directory, shared by the
user's processes and stopped by the last; a bounded WiredTiger cache. Real mongod processes throughout."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from pymongo import MongoClient

from conftest import ROOT
from fathompipe.config import ConfigError, EvaluateConfig, Resources, load_config
from fathompipe.evaluation import fiftyone_env, private_database
from other_user import listeners, need_root
from support.mongod import PrivateMongod


@pytest.fixture(autouse=True)
def no_database_uri(fiftyone_db, monkeypatch, tmp_path):
    """No FIFTYONE_DATABASE_URI (the suite's private mongod), the environment restored afterwards."""
    saved = dict(os.environ)
    for var in ("FIFTYONE_DATABASE_URI", "FIFTYONE_DATABASE_NAME", "FIFTYONE_DATABASE_DIR", "FIFTYONE_CONFIG_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)
    yield
    private_database.release_all()
    os.environ.clear()
    os.environ.update(saved)
    shutil.rmtree(private_database.state_dir(tmp_path / "db"), ignore_errors=True)  # its socket directory in /tmp


def mongods_on(data_dir: Path) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and p.info["cmdline"][0].endswith("mongod")
            and str(data_dir) in p.info["cmdline"]]


def test_socket_only_private_directory_and_bounded_cache(tmp_path):
    db = private_database.ManagedMongod(tmp_path / "db", cache_gb=0.25).acquire()
    try:
        assert db.started and db.uri == "mongodb://" + str(db.socket).replace("/", "%2F")
        (proc,) = mongods_on(db.data_dir)
        ports, sockets, _ = listeners(proc.pid)
        assert ports == set() and sockets == {str(db.socket)}  # no TCP port at all
        for directory in (db.state, db.state.parent):
            assert directory.stat().st_mode & 0o777 == 0o700 and directory.stat().st_uid == os.getuid()
        client = MongoClient(db.uri, serverSelectionTimeoutMS=10000)
        cache = client.admin.command("serverStatus")["wiredTiger"]["cache"]["maximum bytes configured"]
        assert cache == 0.25 * 2**30
        client.close()
    finally:
        db.release()
    assert not mongods_on(db.data_dir) and not db.socket.exists()


def test_processes_share_one_mongod_and_the_last_one_stops_it(tmp_path):
    """The App, a job and a researcher's session on one node use one mongod per data directory."""
    data = tmp_path / "db"
    first = private_database.ManagedMongod(data).acquire()
    other = subprocess.Popen([sys.executable, "-m", "fathompipe.database", "--database-dir", str(data)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        printed = other.stdout.readline() + other.stdout.readline() + other.stdout.readline()
        assert f"export FIFTYONE_DATABASE_URI={first.uri} FIFTYONE_DATABASE_VALIDATION=false" in printed
        assert len(mongods_on(first.data_dir)) == 1
        first.release()  # the starter leaves; the other process still uses the database
        assert first.answers() and len(mongods_on(first.data_dir)) == 1
        client = MongoClient(first.uri, serverSelectionTimeoutMS=10000)
        client.kept.docs.insert_one({"a": 1})
        client.close()
        other.send_signal(signal.SIGINT)
        assert other.wait(60) == 0
        assert not mongods_on(first.data_dir) and not first.socket.exists()
    finally:
        if other.poll() is None:
            other.kill()
    with private_database.ManagedMongod(data) as again:  # data kept across restarts
        assert MongoClient(again.uri).kept.docs.count_documents({}) == 1


def test_a_data_directory_another_mongod_holds_is_one_clear_error(tmp_path):
    (tmp_path / "db").mkdir()
    fiftyone_style = PrivateMongod(dbpath=tmp_path / "db")  # loopback TCP, as FiftyOne's own service runs it
    try:
        with pytest.raises(private_database.MongodError,
                           match=rf"open by another mongod \(pid {fiftyone_style.proc.pid}:.*"
                                 r"FiftyOne's own database service"):
            private_database.ManagedMongod(tmp_path / "db").acquire()
    finally:
        fiftyone_style.stop()
    # a mongod that fathompipe started on another host of a shared filesystem
    (tmp_path / "db" / "mongod.lock").write_text("4242\n")
    (tmp_path / "db" / private_database.INFO_FILE).write_text(json.dumps({"host": "atl1-1-02-003-5", "pid": 4242}))
    with pytest.raises(private_database.MongodError,
                       match="started on host atl1-1-02-003-5 \\(pid 4242\\), which did not "
                             "shut down cleanly; if it no longer runs there, remove"):
        private_database.ManagedMongod(tmp_path / "db").acquire()
    with open(tmp_path / "db" / "mongod.lock", "rb") as held:  # ... still running there: its lock is held
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(private_database.MongodError,
                           match="started on host atl1-1-02-003-5 \\(pid 4242\\); use the database there"):
            private_database.ManagedMongod(tmp_path / "db").acquire()


def test_the_socket_directory_must_be_this_users(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(private_database.MongodError, match="not a directory of this user"):
        private_database.private_dir(tmp_path / "link")
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    assert private_database.private_dir(loose).stat().st_mode & 0o777 == 0o700


def test_a_directory_another_user_created_first_is_refused(tmp_path):
    need_root()
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o777)
    os.chown(planted, 65534, 65534)  # nobody got there first
    with pytest.raises(private_database.MongodError, match="owner uid 65534"):
        private_database.private_dir(planted)


def test_configure_starts_it_without_a_uri_and_respects_one(tmp_path):
    where = fiftyone_env.configure(database_dir=str(tmp_path / "db"), cache_gb=0.25)
    db = private_database.in_use(os.environ["FIFTYONE_DATABASE_URI"])
    assert db is not None and where["private_database"] == str(db.data_dir)
    assert "reachable by this user only through" in fiftyone_env.describe(where)
    assert fiftyone_env.configure(database_dir=str(tmp_path / "db")) == where  # the next split: the same one
    fiftyone_env.release_database()
    assert not mongods_on(db.data_dir)

    # the URI `python -m fathompipe.database` printed, exported in the shell a job is submitted from: the job
    # (on any node) starts or joins the private database rather than expecting someone else to run it
    os.environ["FIFTYONE_DATABASE_URI"] = private_database.private_uri(tmp_path / "db")
    os.environ["FIFTYONE_DATABASE_DIR"] = str(tmp_path / "db")
    assert "private_database" in fiftyone_env.configure() and private_database.in_use(db.uri).started
    fiftyone_env.release_database()
    del os.environ["FIFTYONE_DATABASE_DIR"]

    os.environ.pop("FIFTYONE_DATABASE_URI")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"database_uri": "mongodb://lab-db.example:27017"}))
    os.environ["FIFTYONE_CONFIG_PATH"] = str(config)  # a shared MongoDB in FiftyOne's own config.json
    where = fiftyone_env.configure()
    assert where == {"database": "mongodb://lab-db.example:27017"}
    assert "FIFTYONE_DATABASE_URI" not in os.environ  # fiftyone reads config.json itself; nothing was started
    with pytest.raises(fiftyone_env.FiftyOneSetupError, match="evaluate.database_dir=.* choose one"):
        fiftyone_env.configure(database_dir=str(tmp_path / "db"))


def test_the_job_sizes_the_cache_from_its_memory(tmp_path):
    from fathompipe.evaluate import connect

    where = connect(EvaluateConfig(database_dir=str(tmp_path / "db"), resources=Resources(mem_gb=3)))
    assert "WiredTiger cache 0.75 GB" in where
    (proc,) = mongods_on((tmp_path / "db").resolve())
    assert proc.cmdline()[proc.cmdline().index("--wiredTigerCacheSizeGB") + 1] == "0.75"
    assert private_database.cache_gb_for(8) == 2 and private_database.cache_gb_for(0.5) == 0.25


def test_config_fields(tmp_path):
    local = ROOT / "jobs" / "local.yaml"
    cfg = load_config(local, [f"evaluate.database_dir={tmp_path}/db", "evaluate.database_cache_gb=1.5"])
    assert cfg.evaluate.database_dir == f"{tmp_path}/db" and cfg.evaluate.database_cache_gb == 1.5
    with pytest.raises(ConfigError, match="evaluate.database_cache_gb=0.1: must be at least 0.25"):
        load_config(local, ["evaluate.database_cache_gb=0.1"])
    with pytest.raises(ConfigError, match="evaluate.database_dir=.*evaluate.database_uri or evaluate.deployment"):
        load_config(local, ["evaluate.database_dir=/x", "evaluate.database_uri=mongodb://db:27017"])
