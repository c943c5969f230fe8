"""The installed package holds the product only: no tests, benchmarks, demo or stand-in server."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_holds_no_scaffolding(tmp_path):
    # from a copy of the tracked and new files: an in-tree build/ of older modules would otherwise leak into it
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("fathompipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fathompipe/submit.py" in names and "fathompipe/data/taxonomy.csv" in names
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fathompipe", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    scaffolding = ("fakeserver", "synthetic", "mongod", "reference_recipe", "drills", "demo", "conftest", "test_",
                   "bench")
    leaked = [n for n in names if any(word in n for word in scaffolding)]
    assert not leaked, leaked
