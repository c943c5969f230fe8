"""Where each configuration value came from, secrets kept out of the configuration, paths that mean the same
files from any directory."""
import ast
import dataclasses
import json

import pytest

from conftest import PARITY, ROOT
from fathompipe import config
from fathompipe.config import ConfigError, EvaluateConfig, load_config, to_yaml

ANN = PARITY / "dataset.json"


def test_origin_of_a_key_is_the_override_else_the_profile():
    o = config.origins("jobs/pace.yaml", ["infer.resources.qos=x", "download.resources={mem_gb: 1}"])
    assert o.where("infer.resources.qos") == "command line" and o.where("infer.resources.account") == "jobs/pace.yaml"
    assert o.change("download.resources.mem_gb") == "on the command line (download.resources={mem_gb: 1})"
    assert o.change("infer.resources.partition") == "in jobs/pace.yaml"
    assert config.origins(None, []).change("infer.resources.qos") == "with infer.resources.qos=... on the command line"


def test_validation_names_the_command_line_when_an_override_set_the_value(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text(json.dumps({"data": {"test": {"annotations": str(ANN), "images_dir": str(tmp_path)}}}))
    with pytest.raises(ConfigError, match=r"^command line: download.num_shards=0: must be at least 1"):
        load_config(profile, ["download.num_shards=0"])
    profile.write_text(profile.read_text()[:-1] + ', "download": {"num_shards": 0}}')
    with pytest.raises(ConfigError, match=rf"^{profile}: download.num_shards=0"):
        load_config(profile)


@pytest.mark.parametrize("override, key", [
    ("evaluate.database_uri=mongodb://alice:s3cret@db:27017/", "evaluate.database_uri"),
    ("evaluate.database_uri=mongodb+srv://alice:s3cret@cluster0.example.net/", "evaluate.database_uri"),
    ("infer.resources.extra={api_key: s3cret}", "infer.resources.extra.api_key"),
    ("evaluate.database_uri=mongodb://alice:***@db:27017/", "evaluate.database_uri"),  # an older config.yaml's
])
def test_secrets_are_refused_naming_the_key_never_the_secret(tmp_path, override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"data.test.annotations={ANN}", f"data.test.images_dir={tmp_path}", override])
    assert key in str(exc.value) and "s3cret" not in str(exc.value) and "environment" in str(exc.value)


def test_config_yaml_rebuilds_the_same_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "jobs/local.yaml", [f"data.test.annotations={ANN}", "data.test.images_dir=imgs",
                                                 "evaluate.database_uri=mongodb://db.example:27017/"])
    assert cfg.data.test.images_dir == str(tmp_path / "imgs")  # relative: to where the command ran
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    monkeypatch.chdir(ROOT)
    assert load_config(saved) == cfg  # what resubmit and status read back, from any directory


def test_no_bare_dataclasses_field_beside_evaluate_configs_field_setting():
    tree = ast.parse((ROOT / "fathompipe" / "config.py").read_text())
    bare = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "dataclasses"
            for a in node.names if a.name == "field" and a.asname is None]
    assert bare == []  # `field` is a setting of EvaluateConfig: the function under that name would be shadowed
    assert "field" in {f.name for f in dataclasses.fields(EvaluateConfig)}
