"""Fetching images over HTTP: one asyncio client per process, with bounded retries (Retry-After honoured),
streaming to a hidden temporary file, and verification (length, PNG CRCs, the annotated size) before the rename."""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import aiohttp
from PIL import Image as PILImage

from fathompipe.annotations import Image
from fathompipe.config import DownloadConfig
from fathompipe.fetch.pngcheck import PngStream
from fathompipe.fetch.records import ImageRecord

PERMANENT_MISSING = {404, 410}  # only these mean "not there"; any other 4xx (a proxy's 403) is retried
CHUNK = 1 << 20  # read size when hashing a file already on disk


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
