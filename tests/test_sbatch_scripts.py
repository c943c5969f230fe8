"""The plain sbatch scripts run real Slurm jobs without the driver."""
import os
import subprocess

from conftest import DATA, ROOT
from fathompipe.annotations import load_coco
from support.fakeserver import Faults


def test_download_sbatch_array(slurm, tmp_path, fake_fathomnet):
    server, ann = fake_fathomnet(DATA / "dataset_test.json", Faults(http_503=0.1, retry_after_s=0), limit=20)
    images = tmp_path / "images"
    env = {**os.environ, "ANNOTATIONS": str(ann), "IMAGES_DIR": str(images), "NUM_SHARDS": "3"}
    proc = subprocess.run(["sbatch", "--wait", "--array=0-2", "--mem=1G", f"--output={tmp_path}/dl-%A_%a.log",
                           "sbatch/download.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(p.read_text() for p in tmp_path.glob("dl-*.log"))
    for im in load_coco(ann).images:
        assert (images / im.file_name).read_bytes() == (server.directory / im.file_name).read_bytes()
    assert len(list((images / ".fathompipe").glob("*.done"))) == 3
