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
import asyncio
import contextlib
import email.utils
import hashlib
import json
import os
import random
import signal
import sys
import multiprocessing as mp
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Callable, Dict, List, Optional

import aiohttp
from PIL import Image as PILImage
from tqdm import tqdm

from fathompipe import atomic
from fathompipe.annotations import Image, load_coco, shard_images
from fathompipe.cli import add_options, from_args
from fathompipe.config import DownloadConfig
from fathompipe.fetch.pngcheck import PngStream
from fathompipe.jobs import DownloadJob

PERMANENT_MISSING = {404, 410}  # only these mean "not there"; any other 4xx (a proxy's 403) is retried
CHUNK = 1 << 20  # read size when hashing a file already on disk
MIN_IMAGES_PER_PROCESS = 16  # below this a shard is not worth another process


@dataclass
class ImageRecord:
    """What happened to one image; the last record of an image id in a shard file wins."""

    image_id: int
    path: str
    status: str  # ok | missing (permanent) | failed (transient, retry later)
    bytes: int = 0
    sha256: str = ""
    attempts: int = 0
    error: str = ""
    source: str = ""  # downloaded | adopted | recorded (unchanged since a previous run)
    mtime_ns: int = 0


@dataclass
class ShardSummary:
    key: str
    total: int
    ok: int = 0
    missing: int = 0
    failed: int = 0
    downloaded: int = 0
    bytes_downloaded: int = 0
    requests: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    def add(self, rec: "ImageRecord") -> None:
        setattr(self, rec.status, getattr(self, rec.status) + 1)
        self.requests += rec.attempts
        if rec.source == "downloaded":
            self.downloaded += 1
            self.bytes_downloaded += rec.bytes

    @property
    def complete(self) -> bool:
        return not self.interrupted and self.failed == 0 and self.ok + self.missing == self.total

    def line(self) -> str:
        rate = self.bytes_downloaded / max(self.seconds, 1e-9) / 1e6
        state = "complete" if self.complete else ("INTERRUPTED" if self.interrupted else "INCOMPLETE")
        return (f"shard {self.key}: {state}: {self.ok}/{self.total} ok ({self.downloaded} downloaded, "
                f"{self.ok - self.downloaded} already on disk), {self.missing} permanently missing, "
                f"{self.failed} failed; {self.requests} requests, {self.bytes_downloaded / 1e6:.1f} MB "
                f"in {self.seconds:.1f}s ({rate:.1f} MB/s)")


@dataclass(frozen=True)
class ShardFiles:
    """Where a shard's records and completion marker live."""

    state_dir: Path
    key: str

    @classmethod
    def of(cls, state_dir: str | Path, name: str, shard: int, num_shards: int) -> "ShardFiles":
        return cls(Path(state_dir), f"{name}-{shard:05d}-of-{num_shards:05d}")

    @property
    def records(self) -> Path:
        return self.state_dir / f"{self.key}.jsonl"

    @property
    def marker(self) -> Path:
        return self.state_dir / f"{self.key}.done"

    def load_records(self) -> Dict[int, ImageRecord]:
        records: Dict[int, ImageRecord] = {}
        if self.records.exists():
            for line in self.records.read_text().splitlines():
                try:
                    rec = ImageRecord(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # a line cut by a kill; the image is simply re-checked
                records[rec.image_id] = rec
        return records


def verify_image(path: Path, width: int, height: int) -> Optional[str]:
    """None when `path` holds an intact image of the expected size, else why not.

    PNG (FathomNet's format): header plus the CRC of every chunk through IEND, which catches any
    flipped or missing byte without inflating the pixels. Other formats are fully decoded.
    """
    try:
        with PILImage.open(path) as im:
            if im.size != (width, height):
                return f"image is {im.size[0]}x{im.size[1]}, annotations say {width}x{height}"
            fmt = im.format
            im.verify()
        if fmt != "PNG":
            with PILImage.open(path) as im:
                im.load()
    except Exception as exc:  # Pillow raises many types for bad data
        return f"not a valid image: {type(exc).__name__}: {exc}"
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Parse Retry-After (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class TransientError(Exception):
    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


Report = Callable[[ImageRecord], None]


class Downloader:
    """Fetches a group of images on one event loop and reports each image's record when it is final.

    Hashing, the PNG check and writing run inline: a shard scales by running one of these per CPU
    (`DownloadProcesses`), which costs no thread hand-offs and no GIL contention.
    """

    def __init__(self, images_dir: Path, naming: str, options: DownloadConfig, connections: int, per_host: int):
        self.images_dir = images_dir
        self.naming = naming
        self.options = options
        self.connections = connections
        self.per_host = per_host

    def _adopt(self, image: Image, path: Path) -> Optional[ImageRecord]:
        """A record if a file already on disk (from any tool) is the valid image, else None (it is removed)."""
        if not path.exists():
            return None
        error = verify_image(path, image.width, image.height)
        if error is None:
            st = path.stat()
            return ImageRecord(image.id, str(path), "ok", st.st_size, file_sha256(path), 0, "", "adopted",
                               st.st_mtime_ns)
        print(f"replacing invalid {path}: {error}", file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        return None

    async def _fetch_once(self, session: aiohttp.ClientSession, image: Image, path: Path) -> ImageRecord:
        tmp: Optional[Path] = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            async with session.get(image.coco_url) as resp:
                if resp.status in PERMANENT_MISSING:
                    return ImageRecord(image.id, str(path), "missing", error=f"HTTP {resp.status}")
                if resp.status != 200:
                    raise TransientError(f"HTTP {resp.status}", retry_after_seconds(resp.headers.get("Retry-After")))
                sha256, png, size = hashlib.sha256(), PngStream(), 0
                with open(tmp, "wb") as fh:
                    async for piece in resp.content.iter_any():  # one pass: hash, check, write
                        sha256.update(piece)
                        png.feed(piece)
                        fh.write(piece)
                        size += len(piece)
                expected = resp.content_length
            if expected is not None and size != expected:
                raise TransientError(f"short body: {size} of {expected} bytes")
            # a PNG (FathomNet's format) was checked while streaming; anything else is decoded fully
            if png.is_png:
                error = png.verdict(image.width, image.height)
            else:
                error = verify_image(tmp, image.width, image.height)
            if error is not None:
                raise TransientError(error)
            os.replace(tmp, path)
            tmp = None
            return ImageRecord(image.id, str(path), "ok", size, sha256.hexdigest(), 0, "", "downloaded",
                               path.stat().st_mtime_ns)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        finally:
            if tmp is not None:  # not renamed into place: never leave it behind
                tmp.unlink(missing_ok=True)

    async def _fetch(self, session: aiohttp.ClientSession, image: Image, path: Path) -> ImageRecord:
        o = self.options
        error = ""
        for attempt in range(1, o.max_attempts + 1):
            try:
                rec = await self._fetch_once(session, image, path)
                rec.attempts = attempt
                return rec
            except TransientError as exc:
                error = str(exc)
                if attempt == o.max_attempts:
                    break
                backoff = random.uniform(0, min(o.backoff_max_s, o.backoff_base_s * 2 ** (attempt - 1)))
                delay = min(o.backoff_max_s, exc.retry_after) if exc.retry_after is not None else backoff
                await asyncio.sleep(delay)
        return ImageRecord(image.id, str(path), "failed", attempts=o.max_attempts, error=error)

    async def run(self, images: List[Image], report: Report) -> None:
        o = self.options
        queue: asyncio.Queue[Image] = asyncio.Queue()
        for image in images:
            queue.put_nowait(image)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=o.connect_timeout_s, sock_read=o.read_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.connections, limit_per_host=self.per_host)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, raise_for_status=False) as session:

            async def worker() -> None:
                while not queue.empty():
                    image = queue.get_nowait()
                    path = self.images_dir / image.local_name(self.naming)
                    report(self._adopt(image, path) or await self._fetch(session, image, path))

            await asyncio.gather(*(worker() for _ in range(min(self.connections, max(1, len(images))))))

    def run_until_stopped(self, images: List[Image], report: Report) -> bool:
        """Run to the end, or until SIGTERM/SIGINT (scancel, a time limit); True if stopped."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            stopping = False

            def stop() -> None:  # once: a second signal must not cut the clean-up short
                nonlocal stopping
                if not stopping:
                    stopping = True
                    task.cancel()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop)
            try:
                await self.run(images, report)
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            return True
        return False


def _process_main(conn: Connection, downloader: Downloader, images: List[Image]) -> None:
    """One download process: fetch its images, sending each record to the parent as it is final."""
    # a dead parent turns into BrokenPipeError in conn.send, which ends this process too
    stopped = downloader.run_until_stopped(images, conn.send)
    conn.close()
    sys.exit(143 if stopped else 0)


class DownloadProcesses:
    """One Downloader process per group of images, sending records to this process, which alone writes them.

    Started before any other thread exists where possible (tqdm's monitor is one): then fork is safe
    and cheapest; otherwise forkserver avoids forking other threads mid-lock. SIGTERM and SIGINT are
    forwarded, so every process stops cleanly.
    """

    def __init__(self, downloader: Downloader, groups: List[List[Image]]):
        ctx = mp.get_context("fork" if threading.active_count() == 1 else "forkserver")
        self.procs: List[BaseProcess] = []
        self.conns: List[Connection] = []
        self.stopping = False
        for group in groups:
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_process_main, args=(writer, downloader, group), daemon=True)
            proc.start()
            writer.close()
            self.procs.append(proc)
            self.conns.append(reader)
        self._handlers = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _forward(self, signum: int, frame: object) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    def collect(self, on_record: Report) -> bool:
        """Hand every record to `on_record` until all processes end; True if stopped by a signal."""
        live = list(self.conns)
        while live:
            for conn in mp_connection.wait(live):
                try:
                    on_record(conn.recv())  # type: ignore[arg-type]
                except EOFError:
                    live.remove(conn)
        for proc in self.procs:
            proc.join()
            if proc.exitcode not in (0, 143):
                print(f"download process {proc.pid} exited with code {proc.exitcode}", file=sys.stderr, flush=True)
        return self.stopping or any(proc.exitcode == 143 for proc in self.procs)

    def __enter__(self) -> "DownloadProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)


def process_count(options: DownloadConfig, n_images: int) -> int:
    """Processes for a shard: one per CPU the job may use (or as configured), never idle ones."""
    wanted = options.processes or len(os.sched_getaffinity(0))
    return max(1, min(wanted, n_images // MIN_IMAGES_PER_PROCESS, options.concurrency))


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
    dataset = load_coco(job.source.annotations)
    images_dir = Path(job.source.images_dir)
    state_dir = Path(job.state_dir) if job.state_dir else images_dir / ".fathompipe"
    files = ShardFiles.of(state_dir, job.name or Path(job.source.annotations).stem, shard, num_shards)
    images = shard_images(dataset, shard, num_shards)
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
