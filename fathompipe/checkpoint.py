"""Checkpoint stage: get the winner's Lightning checkpoint, load it safely, export slim weights.

    python -m fathompipe.checkpoint --checkpoint PATH [--gdrive-id ID | --url URL] [--encoder-config F]

The 16 GB file is a pickle from Google Drive, so it is opened with `weights_only=True` and an
explicit allowlist of the globals a Lightning checkpoint needs; nothing in the file executes. Any
other global (another Lightning version's callback or loop state, a numpy scalar in a metric) gets
an inert stand-in that only records its arguments, and is refused inside `state_dict` or
`hyper_parameters`, the parts inference uses. It is memory-mapped, so the optimizer state is never read. Once, the
tensors inference uses go to `<stem>.inference.safetensors` with `<stem>.inference.json` (class
names, architecture sizes, the source's size and mtime) beside it; while the source is unchanged
later runs reuse them and never open the 16 GB file again.
"""
from __future__ import annotations

import argparse
import os
import sys

from pathlib import Path
from typing import List, Optional

import requests

from fathompipe.cli import add_options, from_args
from fathompipe.config import WINNER_GDRIVE_ID
from fathompipe.jobs import CheckpointJob
from fathompipe.layout import SlimFiles
from fathompipe.model.slim import CheckpointError, CorruptCheckpoint
from fathompipe.model.winner import CheckpointMismatch
from fathompipe.model.weights import export_slim

QUOTA_HELP = (
    "Google Drive refused the download: too many users have downloaded this file recently (Drive's quota). "
    "Wait a few hours and rerun, or download it by hand in a browser from "
    "https://drive.google.com/file/d/{id}/view while signed in to Google, copy it to {path} "
    "(e.g. with scp or Globus), and rerun: an existing file is verified, not downloaded again.")


def download(checkpoint: Path, gdrive_id: str = WINNER_GDRIVE_ID, url: Optional[str] = None) -> None:
    """Fetch the checkpoint with gdown, resuming a partial download."""
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {'from ' + url if url else 'Google Drive file ' + gdrive_id} to {checkpoint} (resumable)")
    try:
        result = gdown.download(url=url, id=None if url else gdrive_id, output=str(checkpoint), quiet=False,
                                resume=True)
    except requests.RequestException as exc:
        raise CheckpointError(f"download of {checkpoint} failed: {exc}; rerun to resume it") from None
    except FileURLRetrievalError as exc:
        if "too many users" in str(exc).lower() or "quota" in str(exc).lower():
            raise CheckpointError(QUOTA_HELP.format(id=gdrive_id, path=checkpoint)) from None
        raise CheckpointError(f"download failed: {str(exc).splitlines()[0]}. " +
                              QUOTA_HELP.format(id=gdrive_id, path=checkpoint).split(". ", 1)[1]) from None
    if result is None or not checkpoint.exists():
        raise CheckpointError(f"download of {checkpoint} did not complete; rerun to resume it")

def prepare(checkpoint: str | Path, gdrive_id: str = WINNER_GDRIVE_ID, url: Optional[str] = None,
            encoder_config: Optional[str | Path] = None) -> SlimFiles:
    """The stage: download if absent, verify, export slim files. Idempotent.

    A file that is not a readable checkpoint at all (a truncated copy) is useless: it is moved aside
    to `<name>.corrupt`, never deleted, and a fresh copy is downloaded. A readable file that fails
    the allowlist or the key check is refused as it is: downloading would not explain it.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        download(checkpoint, gdrive_id, url)
    try:
        return export_slim(checkpoint, encoder_config)
    except CorruptCheckpoint as exc:
        aside = checkpoint.with_name(checkpoint.name + ".corrupt")
        os.replace(checkpoint, aside)
        print(f"{exc}: moved it to {aside} (delete it when you no longer need it); downloading a fresh copy",
              flush=True)
        try:
            download(checkpoint, gdrive_id, url)
        except CheckpointError as dl:
            raise CheckpointError(f"{exc} (moved to {aside}), and a fresh copy could not be downloaded: {dl}") from None
    return export_slim(checkpoint, encoder_config)

def run(job: CheckpointJob) -> SlimFiles:
    """The stage as the driver and the command line run it."""
    return prepare(job.options.path, job.options.gdrive_id, job.options.url, job.encoder_config)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.checkpoint", description=__doc__.split("\n\n")[0])
    add_options(parser, CheckpointJob)
    try:
        slim = run(from_args(CheckpointJob, parser.parse_args(argv)))
    except (CheckpointError, CheckpointMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"slim weights: {slim.weights}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
