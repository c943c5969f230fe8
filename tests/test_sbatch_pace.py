"""jobs/pace.yaml renders four complete scripts, and the README and plain sbatch scripts say what it says."""
from __future__ import annotations

import re
from typing import Dict

import pytest

from conftest import ROOT
from fathompipe.config import Resources, load_config
from fathompipe.layout import RunPaths
from fathompipe.pipeline.scheduler import render_sbatch
from fathompipe.pipeline.graph import STAGE_CODES, STAGES, job_comment, job_name

SHIPPED = ROOT / "fathompipe" / "data" / "dataset_test.json"


@pytest.fixture
def pace(tmp_path):
    cfg = load_config(ROOT / "jobs" / "pace.yaml", [f"run_dir={tmp_path / 'run'}",
                                                     f"data.train.annotations={SHIPPED}",
                                                     f"data.test.annotations={SHIPPED}",
                                                     f"checkpoint.path={tmp_path / 'last-002.ckpt'}"])
    return cfg, RunPaths.of(cfg.run_dir)


def sbatch_options(script: str) -> Dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))


def test_pace_renders_four_complete_scripts(pace):
    cfg, paths = pace
    seen = set()
    for stage in STAGES:
        r = stage.resources(cfg)
        n = len(stage.tasks(cfg, paths))
        dep = "afterok:1" if stage.after else ""
        opts = sbatch_options(render_sbatch(r, job_name(paths.root, stage.name), paths.logs(stage.name), n, dep,
                                            comment=job_comment(paths.root)))
        seen.add(stage.name)
        assert opts["account"] == "paceship-dsgt_clef2026" and opts["qos"] == "inferno", stage.name
        assert "partition" not in opts  # Phoenix routes by the resources asked for
        assert opts["job-name"] == f"{STAGE_CODES[stage.name]}.run" and opts["comment"] == f"fathompipe:{paths.root}"
        assert opts["mem"] == f"{int(r.mem_gb * 1024)}M" and opts["cpus-per-task"] == str(r.cpus_per_task)
        assert opts["time"] == str(r.timeout_min)
        assert ("gpus-per-node" in opts) == (stage.name == "infer")
        assert (opts.get("kill-on-invalid-dep") == "yes") == bool(stage.after)
        assert opts["output"].startswith(str(paths.logs(stage.name)))
    assert seen == {"download", "checkpoint", "infer", "evaluate"}
    download = sbatch_options(render_sbatch(cfg.download.resources, "download.x", paths.logs("download"), 64))
    assert download["array"] == "0-63%8"  # 32 shards for each of the two splits, 8 at once


def _readme_rows() -> Dict[str, str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("What each job asks for (`jobs/pace.yaml`)", 1)[1].split("\n\n", 2)[1]
    return {row.split("|")[1].strip().split(",")[0].split()[0]: row.split("|")[2].strip()
            for row in table.splitlines()[2:]}


def _described(r: Resources) -> str:
    gpu = f"{r.gpus_per_node} GPU, " if r.gpus_per_node else ""
    hours = f"{r.timeout_min // 60} h" if r.timeout_min % 60 == 0 else f"{r.timeout_min} min"
    return f"{gpu}{r.cpus_per_task} CPUs, {r.mem_gb:g} GB, {hours}"


def test_readme_resource_table_matches_pace(pace):
    cfg, _ = pace
    rows = _readme_rows()
    for stage in STAGES:
        assert rows[stage.name].startswith(_described(stage.resources(cfg))), (stage.name, rows[stage.name])
    assert "(8 at once)" in (ROOT / "README.md").read_text() and cfg.download.resources.array_parallelism == 8


def test_plain_sbatch_scripts_ask_what_pace_asks_and_log_under_logs(pace):
    cfg, _ = pace
    for stage in STAGES:
        script = (ROOT / "sbatch" / f"{stage.name}.sbatch").read_text()
        opts = sbatch_options(script)
        r = stage.resources(cfg)
        assert opts["job-name"] == stage.name
        assert opts["mem"] == f"{r.mem_gb:g}G" and opts["cpus-per-task"] == str(r.cpus_per_task)
        hours, minutes = divmod(r.timeout_min, 60)
        assert opts["time"] == f"{hours:02d}:{minutes:02d}:00"
        assert opts["output"].startswith("logs/") and "mkdir -p logs" in script
        assert ("gres" in opts) == (stage.name == "infer")
        assert "partition" not in script.replace("#SBATCH", "")  # no cluster-specific partition promised


def test_deployment_profile_renders_its_arrays_within_slurms_limit(tmp_path):
    """jobs/deployment.yaml (a 2M-ROI deployment): 1,000 download tasks, 8 GPU tasks, the sizes the README's
    deployment table gives; every array within Slurm's default MaxArraySize."""
    cfg = load_config(ROOT / "jobs" / "deployment.yaml", [f"run_dir={tmp_path / 'run'}",
                                                           f"data.train.annotations={SHIPPED}",
                                                           f"checkpoint.path={tmp_path / 'last-002.ckpt'}"])
    paths = RunPaths.of(cfg.run_dir)
    counts = {stage.name: len(stage.tasks(cfg, paths)) for stage in STAGES}
    assert counts == {"download": 1000, "checkpoint": 1, "infer": 8, "evaluate": 1}
    download = sbatch_options(render_sbatch(cfg.download.resources, "dl.x", paths.logs("download"), 1000))
    assert download["array"] == "0-999%16" and download["mem"] == "1024M"
    readme = (ROOT / "README.md").read_text().split("## A deployment of 2,000,000 ROIs", 1)[1]
    assert "1,000 tasks (400 images each), 16 at once | 2 CPUs, 1 GB, 1 h" in readme
    assert "8 GPU tasks (`infer.shards`) | 1 GPU, 8 CPUs, 48 GB, 2 h each" in readme
