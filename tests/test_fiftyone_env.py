"""FiftyOne Enterprise deployments: NAME_FIFTYONE_API_URI/KEY from the environment or .env, read at run time."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import DATA, ROOT
from fathompipe.evaluation import fiftyone_env
from fathompipe.config import ConfigError, load_config, to_yaml

KEY = "planted-key-0c1d2e3f"


@pytest.fixture
def clean_env(monkeypatch):
    """No FiftyOne API variables; the whole environment restored afterwards (the code under test sets some)."""
    saved = dict(os.environ)
    for var in list(os.environ):
        if "FIFTYONE_API" in var:
            monkeypatch.delenv(var)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_deployment_from_dotenv_maps_onto_the_plain_variables(clean_env, tmp_path):
    (tmp_path / ".env").write_text(f'MURILO_FIFTYONE_API_URI="https://murilo.example"\nMURILO_FIFTYONE_API_KEY={KEY}\n'
                                   f"UNRELATED_TOKEN=stays-out\n")
    sub = tmp_path / "project" / "jobs"
    sub.mkdir(parents=True)
    clean_env.chdir(sub)  # found in a parent directory, as python-dotenv's find_dotenv does
    path = fiftyone_env.dotenv_file()
    assert path == tmp_path / ".env"
    fiftyone_env.load_dotenv_fiftyone(path)
    assert fiftyone_env.use_deployment("murilo", str(path)) == "https://murilo.example"
    assert os.environ["FIFTYONE_API_URI"] == "https://murilo.example" and os.environ["FIFTYONE_API_KEY"] == KEY
    assert "UNRELATED_TOKEN" not in os.environ and fiftyone_env.api_connection()


def test_environment_wins_over_dotenv(clean_env, tmp_path):
    env_file = tmp_path / "lab.env"
    env_file.write_text("PRERNA_FIFTYONE_API_URI=https://from-file\nPRERNA_FIFTYONE_API_KEY=file-key\n")
    clean_env.setenv("PRERNA_FIFTYONE_API_KEY", "shell-key")
    fiftyone_env.load_dotenv_fiftyone(fiftyone_env.dotenv_file(str(env_file)))
    fiftyone_env.use_deployment("prerna", str(env_file))
    assert os.environ["FIFTYONE_API_KEY"] == "shell-key" and os.environ["FIFTYONE_API_URI"] == "https://from-file"


def test_missing_deployment_variables_name_them(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    clean_env.setenv("LAB_FIFTYONE_API_URI", "https://lab.example")
    with pytest.raises(fiftyone_env.FiftyOneSetupError, match="deployment 'lab': LAB_FIFTYONE_API_KEY not set"):
        fiftyone_env.configure(deployment="lab")
    with pytest.raises(fiftyone_env.FiftyOneSetupError, match="does not exist"):
        fiftyone_env.configure(deployment="lab", env_file=str(tmp_path / "nope.env"))


def test_plain_variables_keep_working_and_open_source_refuses(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    clean_env.setenv("FIFTYONE_API_URI", "https://plain.example")
    clean_env.setenv("FIFTYONE_API_KEY", KEY)
    assert not fiftyone_env.enterprise_sdk_installed()  # this machine has the open-source package
    with pytest.raises(fiftyone_env.FiftyOneSetupError) as err:
        fiftyone_env.configure()
    assert "FIFTYONE_API_URI/FIFTYONE_API_KEY are set" in str(err.value) and KEY not in str(err.value)


def test_config_holds_the_name_only(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    local = ROOT / "jobs" / "local.yaml"
    cfg = load_config(local, ["evaluate.deployment=murilo", f"evaluate.env_file={tmp_path}/.env"])
    assert "deployment: murilo" in to_yaml(cfg)
    with pytest.raises(ConfigError, match="evaluate.deployment='my-lab'"):
        load_config(local, ["evaluate.deployment=my-lab"])
    with pytest.raises(ConfigError, match="choose one of evaluate.database_uri and evaluate.deployment"):
        load_config(local, ["evaluate.deployment=lab", "evaluate.database_uri=mongodb://db:27017"])


def test_cli_deployment_flag_reads_dotenv_in_the_working_directory(tmp_path):
    (tmp_path / ".env").write_text(f"MURILO_FIFTYONE_API_URI=https://murilo.example\nMURILO_FIFTYONE_API_KEY={KEY}\n")
    env = {k: v for k, v in os.environ.items() if "FIFTYONE_API" not in k}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "fathompipe.evaluate",
                           "--annotations", str(DATA / "dataset_test.json"),
                           "--predictions", str(DATA / "winner_test_predictions.csv"), "--report-dir",
                           str(tmp_path / "r"), "--deployment", "murilo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "deployment 'murilo' (https://murilo.example) selects FiftyOne Enterprise" in proc.stderr
    assert "Traceback" not in proc.stderr and KEY not in proc.stdout + proc.stderr
    assert (tmp_path / "r" / "report.html").exists()  # the report does not depend on FiftyOne
