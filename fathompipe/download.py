"""Download stage: fetch one shard of a FathomNet COCO file's images, verified and atomic.

    python -m fathompipe.download --annotations F --images-dir D --shard I --num-shards N

Each body streams to a hidden temporary file beside its final name, is checked (length equals
Content-Length, the image is intact, its size matches the annotation file), and only then renamed
into place. Images already on disk and valid are adopted, never fetched again. Per shard, a JSONL
record per image and, written last, a completion marker (the img2dataset pattern). A shard runs one
download process per CPU the job may use; the parent alone writes the records.
Exit status: 0 when every image is on disk or permanently missing (404/410), 1 otherwise: any other
answer (403 from a proxy, 429, 5xx) is retried `max_attempts` times, then the shard stays incomplete.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from fathompipe import atomic
from fathompipe.annotation_table import read_shard
from fathompipe.annotations import Image
from fathompipe.cli import add_options, from_args
from fathompipe.jobs import DownloadJob
from fathompipe.fetch.client import Downloader
from fathompipe.fetch.processes import DownloadProcesses, process_count
from fathompipe.fetch.records import ImageRecord, ShardSummary
from fathompipe.layout import ShardFiles


def _compact_records(files: ShardFiles) -> None:
    """Rewrite the append log as one line per image (latest wins), atomically."""
    records = files.load_records()
    atomic.write_text(files.records, "".join(json.dumps(asdict(r)) + "\n" for r in records.values()))


def _remove_stale_parts(images_dir: Path, names: set) -> None:
    """Temporary files a killed run left behind (only this shard's: other shards may be running)."""
    for entry in os.scandir(images_dir):
        if entry.name.startswith(".") and entry.name.endswith(".part") and entry.name[1:].rsplit(".", 2)[0] in names:
            os.unlink(entry.path)


def _still_recorded(image: Image, path: Path, previous: Optional[ImageRecord]) -> Optional[ImageRecord]:
    """The previous run's record if the file is unchanged since (same size and mtime): no re-check."""
    if previous is None or previous.status != "ok":
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if previous.bytes != st.st_size or previous.mtime_ns != st.st_mtime_ns:
        return None
    return ImageRecord(image.id, str(path), "ok", st.st_size, previous.sha256, 0, "", "recorded", st.st_mtime_ns)


def download_shard(job: DownloadJob, progress: bool = True) -> ShardSummary:
    """Download one shard; the callable the driver submits and the CLI runs.

    Interrupted by SIGTERM or SIGINT (scancel, a time limit), it stops cleanly: no partial image
    is left, every finished image is recorded, and the summary says INTERRUPTED.
    """
    o, naming, shard, num_shards = job.options, job.source.naming, job.shard, job.options.num_shards
    images = read_shard(job.source.annotations, shard, num_shards)  # a run's table: this shard's rows only
    images_dir = Path(job.source.images_dir)
    state_dir = Path(job.state_dir) if job.state_dir else images_dir / ".fathompipe"
    files = ShardFiles.of(state_dir, job.name or Path(job.source.annotations).stem, shard, num_shards)
    summary = ShardSummary(files.key, len(images))
    t0 = time.monotonic()
    files.marker.unlink(missing_ok=True)  # re-verify; the marker is rewritten if all is still well
    images_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(images_dir, {image.local_name(naming) for image in images})
    previous = files.load_records()

    recorded, todo = [], []
    for image in images:
        rec = _still_recorded(image, images_dir / image.local_name(naming), previous.get(image.id))
        if rec is not None:
            recorded.append(rec)
        else:
            todo.append(image)
    n = process_count(o, len(todo))
    downloader = Downloader(images_dir, naming, o, -(-o.concurrency // n), -(-o.per_host // n))

    with contextlib.ExitStack() as stack:
        groups = [todo[i::n] for i in range(n)]
        # the processes start before tqdm's monitor thread exists, so they can be forked
        processes = stack.enter_context(DownloadProcesses(downloader, groups)) if n > 1 else None
        log = stack.enter_context(open(files.records, "a"))
        bar = stack.enter_context(tqdm(total=len(images), desc=f"download {files.key}", unit="img",
                                       disable=not progress, dynamic_ncols=True,
                                       mininterval=1.0 if sys.stderr.isatty() else 30.0))

        def on_record(rec: ImageRecord) -> None:
            log.write(json.dumps(vars(rec)) + "\n")
            log.flush()
            summary.add(rec)
            bar.update(1)
            bar.set_postfix(ok=summary.ok, missing=summary.missing, failed=summary.failed,
                            MBps=f"{summary.bytes_downloaded / max(time.monotonic() - t0, 1e-9) / 1e6:.1f}",
                            refresh=False)  # tqdm redraws on its own interval

        for rec in recorded:
            on_record(rec)
        try:
            if processes is not None:
                summary.interrupted = processes.collect(on_record)
            else:
                summary.interrupted = downloader.run_until_stopped(todo, on_record)
        finally:
            summary.seconds = time.monotonic() - t0
            log.close()
            _compact_records(files)
    if summary.complete:
        atomic.write_json(files.marker, asdict(summary))
    print(summary.line(), flush=True)
    return summary


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.download", description=__doc__.split("\n\n")[0])
    add_options(parser, DownloadJob)
    parser.set_defaults(shard=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)), num_shards=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        summary = download_shard(from_args(DownloadJob, args), progress=not args.no_progress)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.interrupted:
        return 143
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
