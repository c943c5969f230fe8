from pathlib import Path

import pytest

from fathompipe.config import ConfigError, load_config, redact, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_local_profile_loads_and_overrides_apply():
    cfg = load_config(ROOT / "jobs/local.yaml", ["download.concurrency=64", "infer.batch_size=8"])
    assert cfg.download.concurrency == 64 and cfg.infer.batch_size == 8
    assert cfg.cluster == "local" and cfg.data.splits == ["test"]


@pytest.mark.parametrize("override, words", [
    (["download.concurrency=abc"], ["download.concurrency", "abc"]),
    (["bogus.key=1"], ["unknown key", "bogus"]),
    (["download.num_shards=0"], ["download.num_shards=0", "at least 1"]),
    (["cluster=kubernetes"], ["cluster='kubernetes'", "slurm, local, debug"]),
    (["data.splits=[train]"], ["data.train.annotations", "required"]),
    (["data.test.annotations=/nope/x.json"], ["data.test.annotations='/nope/x.json'", "does not exist"]),
    (["infer.precision=fp8"], ["infer.precision='fp8'"]),
    (["data.naming=url"], ["data.naming='url'"]),
    (["download.naming=image_id"], ["download.naming has moved to data.naming", "data.naming: image_id"]),
    (["run_dir=$FATHOMPIPE_UNSET_VARIABLE/x"], ["run_dir", "FATHOMPIPE_UNSET_VARIABLE", "not set"]),
    (["noequals"], ["key=value"]),
])
def test_bad_values_name_key_and_value(override, words):
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "jobs/local.yaml", override)
    for word in words:
        assert word in str(exc.value)


def test_profile_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("download:\n  per_hots: 3\n")
    with pytest.raises(ConfigError, match=r"p\.yaml.*per_hots"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_paths_expand_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FP_DATA", str(tmp_path / "data"))
    ann = tmp_path / "data" / "a.json"
    ann.parent.mkdir()
    ann.write_text("{}")
    cfg = load_config(None, ["data.test.annotations=$FP_DATA/a.json", "data.test.images_dir=~/imgs",
                             "run_dir=~/runs/r"])
    assert cfg.data.test.annotations == str(ann)
    assert cfg.data.test.images_dir == str(tmp_path / "imgs")
    assert cfg.run_dir == str(tmp_path / "runs/r")


def test_pace_profile_matches_pace_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    base = tmp_path / "ps-dsgt_clef2026-0/shared/fathomnet-2025"
    base.mkdir(parents=True)
    for name in ("dataset_train.json", "dataset_test.json"):
        (base / name).write_text("{}")
    cfg = load_config(ROOT / "jobs/pace.yaml")
    assert cfg.cluster == "slurm"
    assert cfg.data.test.images_dir == str(base / "test_images")
    assert cfg.checkpoint.path == str(base / "checkpoints/last-002.ckpt")
    assert cfg.infer.resources.partition is None and cfg.infer.resources.gpus_per_node == 1  # Phoenix routes jobs
    for stage in ("download", "checkpoint", "infer", "evaluate"):
        r = getattr(cfg, stage).resources
        assert r.account == "paceship-dsgt_clef2026" and r.qos == "inferno", stage


def test_secrets_are_redacted():
    red = redact({"database_uri": "mongodb://alice:s3cret@db:27017", "api_key": "k", "nested": {"token": "t"}})
    assert red == {"database_uri": "mongodb://alice:***@db:27017", "api_key": "***", "nested": {"token": "***"}}
    assert "s3cret" not in to_yaml(load_config(ROOT / "jobs/local.yaml"))
