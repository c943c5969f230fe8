"""Each stage's command line is generated from its job dataclass: flags, types, defaults and choices agree."""
from __future__ import annotations

import argparse

import pytest

from fathompipe.cli import add_options, from_args
from fathompipe.config import DownloadConfig, EvaluateConfig, InferConfig, SplitSource
from fathompipe.jobs import CheckpointJob, DownloadJob, EvaluateSplit, InferJob


def parse(cls: type, argv: list) -> object:
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return from_args(cls, parser.parse_args(argv))


def test_defaults_come_from_the_dataclasses():
    job = parse(InferJob, ["--annotations", "a.json", "--images-dir", "imgs", "--checkpoint", "c.ckpt",
                           "--output", "o.csv"])
    assert job == InferJob(SplitSource("a.json", "imgs"), "c.ckpt", "o.csv", InferConfig())


def test_values_are_typed_and_nested_sections_filled():
    job = parse(InferJob, ["--annotations", "a.json", "--images-dir", "imgs", "--checkpoint", "c", "--output", "o",
                           "--split", "train", "--naming", "image_id", "--batch-size", "7", "--num-shards", "3",
                           "--shard", "2", "--precision", "bf16"])
    assert job.source == SplitSource("a.json", "imgs", "train", "image_id")
    assert job.options.batch_size == 7 and job.options.shards == 3 and job.shard == 2
    assert job.options.precision == "bf16" and isinstance(job.options.batch_size, int)
    download = parse(DownloadJob, ["--annotations", "a", "--images-dir", "i", "--read-timeout-s", "2.5"])
    assert download.options.read_timeout_s == 2.5
    assert download.options.resources == DownloadConfig().resources  # resources are no option: the section's default


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--precision", "fp8"], ["--naming", "url"],
                                  ["--batch-size", "many"]])
def test_choices_and_types_refuse_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        parse(InferJob, ["--annotations", "a", "--images-dir", "i", "--checkpoint", "c", "--output", "o", *argv])
    assert argv[0] in capsys.readouterr().err


def test_required_fields_are_required_and_renamed_flags_used(capsys):
    with pytest.raises(SystemExit):
        parse(InferJob, ["--images-dir", "i", "--checkpoint", "c", "--output", "o"])
    assert "--annotations" in capsys.readouterr().err
    job = parse(CheckpointJob, ["--checkpoint", "x.ckpt", "--url", "http://mirror/x.ckpt"])
    assert job.options.path == "x.ckpt" and job.options.url == "http://mirror/x.ckpt" and job.encoder_config is None


@pytest.mark.parametrize("classes", [(DownloadJob,), (CheckpointJob,), (InferJob,), (EvaluateSplit, EvaluateConfig)])
def test_help_shows_every_default(classes):
    """`python -m fathompipe.<stage> --help` builds its parser this way: each optional flag says its default."""
    parser = argparse.ArgumentParser()
    for cls in classes:
        add_options(parser, cls)
    optional = [a for a in parser._actions if a.option_strings and not a.required and a.dest != "help"]
    assert optional
    for action in optional:
        assert "default" in (action.help or ""), action.option_strings
    text = " ".join(parser.format_help().split())
    if InferJob in classes:
        assert "--batch-size BATCH_SIZE default: 64" in text
    if EvaluateConfig in classes:
        assert "(default: --fiftyone)" in text and "(default: model_predictions)" in text
        assert "(default: --no-expected-distance-csv)" in text
