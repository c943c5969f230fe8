"""The offline demo: the full pipeline on one machine, no internet, in a few minutes.

    python -m demo [--run-dir runs/demo] [--faults]      (from the repository root)

Serves the shipped demo images (demo/) on loopback in FathomNet's place, uses the parity fixture's
tiny checkpoint in place of the 16 GB one, runs download, checkpoint, infer and evaluate through
submitit's local executor with fathompipe's private FiftyOne database (FiftyOne's mongod on its usual
data directory, on a socket only you can open; jobs/demo.yaml), and ends with the report's path, the
headline numbers and the command that opens the FiftyOne App for you alone (`python -m fathompipe.app`).
Rerunning resumes. It lives with the repository, not in the installed package: it needs the stand-in
server (support/) and the shipped images.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import List

from fathompipe.layout import RunPaths, evaluate_marker
from support.fakeserver import FakeFathomNet, Faults, ServerThread

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
MODEL = ROOT / "tests" / "fixtures" / "parity-golden"  # the tiny checkpoint, one copy for the demo and the tests


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--faults", action="store_true", help="the server also answers 503s, 429s, drops and "
                        "corrupt bodies, as real servers do; the download stage retries through them")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint" / "model.ckpt"
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODEL / "model.ckpt", checkpoint)
    faults = Faults.realistic(retry_after_s=0, missing=0.0) if args.faults else Faults()
    from fathompipe import submit

    annotations = run_dir / "dataset_demo.json"
    # a rerun serves on the port of the first run: the run's annotation file (its image URLs) must not change
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/images/", annotations.read_text()).group(1)) \
        if annotations.exists() else 0
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(ServerThread(FakeFathomNet(DEMO / "images", faults), port=port))
        except OSError as exc:
            print(f"demo: cannot serve the images on port {port} again, where this run's annotation file points "
                  f"({exc}); free the port, or start a new demo with --run-dir", file=sys.stderr)
            return 1
        if not annotations.exists():
            annotations.write_text((DEMO / "dataset_demo.json").read_text()
                                   .replace("http://127.0.0.1:PORT/images/", server.base_url))
        print(f"demo: serving {DEMO / 'images'} at {server.base_url} in FathomNet's place", flush=True)
        rc = submit.main(["--profile", str(ROOT / "jobs" / "demo.yaml"), f"run_dir={run_dir}",
                          f"data.train.annotations={annotations}", f"data.train.images_dir={run_dir / 'images'}",
                          f"checkpoint.path={checkpoint}",
                          f"infer.encoder_config={MODEL / 'tiny_dinov2_config.json'}"])
    if rc != 0:
        print(f"demo: a stage failed; see the message above, then rerun `python -m demo` "
              f"(finished work is kept) or `python -m fathompipe.status --run-dir {run_dir}`", file=sys.stderr)
        return rc
    paths = RunPaths.of(run_dir)
    done = json.loads(evaluate_marker(paths.report_dir("train")).read_text())
    fo = done.get("fiftyone", {})
    print("\n=== fathompipe demo finished ===")
    print(f"report:      {done['report']}")
    print(f"headline:    {done['headline']}")
    print(f"predictions: {paths.predictions('train').csv} (and .parquet)")
    if fo:
        print(f"FiftyOne:    dataset '{fo['dataset']}', field '{fo['field']}', evaluation '{fo.get('eval_key')}', "
              f"saved views '{fo.get('saved_view')}' and '{fo.get('mistakenness_view')}', embeddings "
              f"'{fo.get('brain_key')}'")
        from fathompipe.evaluation.fiftyone_io import app_instructions
        print(f"             {app_instructions(fo['dataset'], fo.get('saved_view'))}")
    print("(synthetic images and a tiny stand-in model: the numbers show the pipeline runs, not the winner's quality)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
