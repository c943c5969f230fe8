"""Download stage: fetch one shard of a FathomNet COCO file's images, verified and atomic.

    python -m fathompipe.download --annotations F --images-dir D --shard I --num-shards N

Each body streams to a hidden temporary file beside its final name, is checked (length equals
Content-Length, the image is intact, its size matches the annotation file), and only then renamed
into place. Images already on disk and valid are adopted, never fetched again. Per shard, a JSONL
record per image and, written last, a completion marker (the img2dataset pattern).
Exit status: 0 when every image is on disk or permanently missing (404/410), 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import email.utils
import hashlib
import json
import os
import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional

import aiohttp
from PIL import Image as PILImage
from tqdm import tqdm

from . import atomic
from .annotations import Image, load_coco, shard_images
from .config import DownloadConfig
from .pngcheck import PngStream

PERMANENT_MISSING = {401, 403, 404, 410}
CHUNK = 1 << 20


# The DownloadConfig fields that shape one shard's run (the rest is Slurm's business).
OPTION_FIELDS = ("concurrency", "per_host", "connect_timeout_s", "read_timeout_s", "max_attempts", "backoff_base_s",
                 "backoff_max_s", "naming")


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


def _consume(h: "hashlib._Hash", png: PngStream, fh: BinaryIO, chunk: bytes) -> None:
    """Hash, check and write one piece of a body (on a worker thread)."""
    h.update(chunk)
    png.feed(chunk)
    fh.write(chunk)


class TransientError(Exception):
    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class Downloader:
    """Fetches a list of images with bounded concurrency; one instance per shard run."""

    def __init__(self, images_dir: Path, options: DownloadConfig, files: ShardFiles, progress: bool):
        self.images_dir = images_dir
        self.options = options
        self.files = files
        self.progress = progress
        # hashing, writing and verifying release the GIL: off the event loop, they overlap the network
        self.pool = ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1)))
        self.records_fh = None

    def _record(self, rec: ImageRecord, summary: ShardSummary, bar: tqdm) -> None:
        assert self.records_fh is not None
        self.records_fh.write(json.dumps(vars(rec)) + "\n")
        self.records_fh.flush()
        if rec.status == "ok":
            summary.ok += 1
        elif rec.status == "missing":
            summary.missing += 1
        else:
            summary.failed += 1
        bar.update(1)
        bar.set_postfix(ok=summary.ok, missing=summary.missing, failed=summary.failed,
                        MBps=f"{summary.bytes_downloaded / max(time.monotonic() - self.t0, 1e-9) / 1e6:.1f}")

    async def _check_existing(self, image: Image, path: Path, previous: Optional[ImageRecord]) -> Optional[ImageRecord]:
        """A record if the file on disk is already the finished image, else None (and it is removed)."""
        if not path.exists():
            return None
        st = path.stat()
        if (previous is not None and previous.status == "ok" and previous.bytes == st.st_size
                and previous.mtime_ns == st.st_mtime_ns):
            return ImageRecord(image.id, str(path), "ok", st.st_size, previous.sha256, 0, "", "recorded", st.st_mtime_ns)
        loop = asyncio.get_running_loop()
        error = await loop.run_in_executor(self.pool, verify_image, path, image.width, image.height)
        if error is None:
            digest = await loop.run_in_executor(self.pool, file_sha256, path)
            return ImageRecord(image.id, str(path), "ok", st.st_size, digest, 0, "", "adopted", st.st_mtime_ns)
        tqdm.write(f"replacing invalid {path}: {error}")
        path.unlink(missing_ok=True)
        return None

    async def _fetch_once(self, session: aiohttp.ClientSession, image: Image, path: Path, summary: ShardSummary) -> ImageRecord:
        tmp: Optional[Path] = path.with_name(f".{path.name}.{os.getpid()}.part")
        summary.requests += 1
        try:
            async with session.get(image.coco_url) as resp:
                if resp.status in PERMANENT_MISSING:
                    return ImageRecord(image.id, str(path), "missing", error=f"HTTP {resp.status}")
                if resp.status != 200:
                    raise TransientError(f"HTTP {resp.status}", retry_after_seconds(resp.headers.get("Retry-After")))
                h = hashlib.sha256()
                png = PngStream()
                size = 0
                loop = asyncio.get_running_loop()
                with open(tmp, "wb") as fh:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        await loop.run_in_executor(self.pool, _consume, h, png, fh, chunk)
                        size += len(chunk)
                expected = resp.content_length
            if expected is not None and size != expected:
                raise TransientError(f"short body: {size} of {expected} bytes")
            if png.is_png:  # checked while streaming: no second read
                error = png.verdict(image.width, image.height)
            else:  # e.g. a JPEG under a .png name: decode it fully
                error = await loop.run_in_executor(self.pool, verify_image, tmp, image.width, image.height)
            if error is not None:
                raise TransientError(error)
            os.replace(tmp, path)
            tmp = None
            summary.downloaded += 1
            summary.bytes_downloaded += size
            return ImageRecord(image.id, str(path), "ok", size, h.hexdigest(), 0, "", "downloaded", path.stat().st_mtime_ns)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        finally:
            if tmp is not None:  # not renamed into place: never leave it behind
                tmp.unlink(missing_ok=True)

    async def _fetch(self, session: aiohttp.ClientSession, image: Image, path: Path, summary: ShardSummary) -> ImageRecord:
        o = self.options
        error = ""
        for attempt in range(1, o.max_attempts + 1):
            try:
                rec = await self._fetch_once(session, image, path, summary)
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

    async def run(self, images: List[Image], summary: ShardSummary) -> None:
        o = self.options
        self.images_dir.mkdir(parents=True, exist_ok=True)
        mine = {image.local_name(o.naming) for image in images}
        for entry in os.scandir(self.images_dir):  # temporary files a killed run left behind
            if entry.name.startswith(".") and entry.name.endswith(".part") and \
                    entry.name[1:].rsplit(".", 2)[0] in mine:
                os.unlink(entry.path)
        previous = self.files.load_records()
        self.files.state_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        queue: asyncio.Queue[Image] = asyncio.Queue()
        for image in images:
            queue.put_nowait(image)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=o.connect_timeout_s, sock_read=o.read_timeout_s)
        connector = aiohttp.TCPConnector(limit=o.concurrency, limit_per_host=o.per_host)
        with open(self.files.records, "a") as self.records_fh, \
                tqdm(total=len(images), desc=f"download {self.files.key}", unit="img", disable=not self.progress,
                     mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True) as bar:
            async with aiohttp.ClientSession(timeout=timeout, connector=connector, raise_for_status=False) as session:

                async def worker() -> None:
                    while not queue.empty():
                        image = queue.get_nowait()
                        path = self.images_dir / image.local_name(o.naming)
                        rec = await self._check_existing(image, path, previous.get(image.id))
                        if rec is None:
                            rec = await self._fetch(session, image, path, summary)
                        self._record(rec, summary, bar)

                await asyncio.gather(*(worker() for _ in range(min(o.concurrency, max(1, len(images))))))


def _compact_records(files: ShardFiles) -> None:
    """Rewrite the append log as one line per image (latest wins), atomically."""
    records = files.load_records()
    atomic.write_text(files.records, "".join(json.dumps(asdict(r)) + "\n" for r in records.values()))


def download_shard(annotations: str | Path, images_dir: str | Path, shard: int, num_shards: int,
                   state_dir: str | Path | None = None, name: str | None = None,
                   options: Optional[DownloadConfig] = None, progress: bool = True) -> ShardSummary:
    """Download shard `shard` of `num_shards`; the callable the driver submits and the CLI runs.

    Interrupted by SIGTERM or SIGINT (scancel, a time limit), it stops cleanly: no partial image
    is left, every finished image is recorded, and the summary says INTERRUPTED.
    """
    options = options or DownloadConfig()
    dataset = load_coco(annotations)
    images_dir = Path(images_dir)
    state_dir = Path(state_dir) if state_dir else images_dir / ".fathompipe"
    files = ShardFiles.of(state_dir, name or Path(annotations).stem, shard, num_shards)
    images = shard_images(dataset, shard, num_shards)
    summary = ShardSummary(files.key, len(images))
    if files.marker.exists():
        files.marker.unlink()  # re-verify; the marker is rewritten if all is still well
    downloader = Downloader(images_dir, options, files, progress)
    t0 = time.monotonic()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await downloader.run(images, summary)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        summary.interrupted = True
    finally:
        downloader.pool.shutdown(wait=True)
        summary.seconds = time.monotonic() - t0
        _compact_records(files)
    if summary.complete:
        atomic.write_json(files.marker, asdict(summary))
    print(summary.line(), flush=True)
    return summary


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fathompipe.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="FathomNet COCO json (train or test)")
    parser.add_argument("--images-dir", required=True)
    parser.add_argument("--shard", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)),
                        help="default: $SLURM_ARRAY_TASK_ID")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--state-dir", help="records and markers (default: IMAGES_DIR/.fathompipe)")
    parser.add_argument("--name", help="shard file prefix (default: the annotation file's stem)")
    defaults = DownloadConfig()
    for f in OPTION_FIELDS:
        value = getattr(defaults, f)
        parser.add_argument(f"--{f.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    options = DownloadConfig(**{f: getattr(args, f) for f in OPTION_FIELDS})
    try:
        summary = download_shard(args.annotations, args.images_dir, args.shard, args.num_shards, args.state_dir,
                                 args.name, options, progress=not args.no_progress)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.interrupted:
        return 143
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
