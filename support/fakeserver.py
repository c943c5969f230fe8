"""A loopback stand-in for FathomNet's image server, with the faults real servers show.

Used by the tests, the download benchmark and the offline demo. It serves the files of one folder
at `/images/<name>` and injects, per request, 503s and 429s with Retry-After, dropped connections,
short bodies, corrupt 200 bodies, stalls and permanent 404s. Faults are drawn from a seeded RNG
keyed by (path, attempt), so a run is reproducible. `log` records every answer (the failure drills
count the images fetched again from it).

    python -m support.fakeserver --dir D --port 8765 [--latency-ms 20] [--faults realistic]
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from aiohttp import web


@dataclass
class Faults:
    """Per-request probabilities (drawn in this order) plus fixed behaviour."""

    http_503: float = 0.0
    http_429: float = 0.0
    drop: float = 0.0  # headers and half the body, then the connection is cut
    short: float = 0.0  # a truncated body whose Content-Length matches it
    corrupt: float = 0.0  # full-length 200 with flipped bytes
    stall: float = 0.0  # half the body, then silence for stall_s
    missing: float = 0.0  # fraction of paths that always answer 404
    retry_after_s: int = 1
    stall_s: float = 30.0
    latency_s: float = 0.0
    seed: int = 0

    @classmethod
    def realistic(cls, **kw: float) -> "Faults":
        """The mix issue 2 names: 10% 503, 5% 429, 5% drops, 5% short, 3% corrupt, 2% 404."""
        mix = dict(http_503=0.10, http_429=0.05, drop=0.05, short=0.05, corrupt=0.03, missing=0.02)
        return cls(**{**mix, **kw})


@dataclass(frozen=True)
class Served:
    """One answer of the server: the file, the HTTP status, and whether its whole intact body went out."""

    name: str
    status: int
    complete: bool


class FakeFathomNet:
    """The aiohttp application plus the request counters and the request log the tests read."""

    def __init__(self, directory: str | Path, faults: Faults = Faults()):
        self.directory = Path(directory)
        self.faults = faults
        self.requests: Counter[str] = Counter()
        self.log: List[Served] = []  # appended by the server's thread only; readers take len() first
        self.app = web.Application()
        self.app.router.add_get("/images/{name}", self.handle)

    def _rng(self, name: str, attempt: int) -> random.Random:
        digest = hashlib.sha256(f"{self.faults.seed}:{name}:{attempt}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def is_missing(self, name: str) -> bool:
        return self._rng(name, -1).random() < self.faults.missing

    def _draw(self, name: str, attempt: int) -> Optional[str]:
        r = self._rng(name, attempt).random()
        f = self.faults
        for kind in ("http_503", "http_429", "drop", "short", "corrupt", "stall"):
            p = getattr(f, kind)
            if r < p:
                return kind
            r -= p
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests[name] += 1
        attempt = self.requests[name]
        if self.faults.latency_s:
            await asyncio.sleep(self.faults.latency_s)
        path = self.directory / name
        if not path.is_file() or self.is_missing(name):
            self.log.append(Served(name, 404, False))
            return web.Response(status=404, text="not found")
        fault = self._draw(name, attempt)
        if fault in ("http_503", "http_429"):
            status = 503 if fault == "http_503" else 429
            self.log.append(Served(name, status, False))
            return web.Response(status=status, headers={"Retry-After": str(self.faults.retry_after_s)})
        body = path.read_bytes()
        if fault == "short":
            body = body[: len(body) // 2]
        elif fault == "corrupt":
            mid = len(body) // 2
            body = body[:mid] + bytes(b ^ 0x5A for b in body[mid: mid + 64]) + body[mid + 64:]
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.content_length = len(body)
        await resp.prepare(request)
        if fault in ("drop", "stall"):
            await resp.write(body[: len(body) // 2])
            if fault == "stall":
                await asyncio.sleep(self.faults.stall_s)
            assert request.transport is not None
            request.transport.close()
            self.log.append(Served(name, 200, False))
            return resp
        await resp.write(body)
        await resp.write_eof()
        self.log.append(Served(name, 200, fault is None))
        return resp


class ServerThread:
    """Run a FakeFathomNet on 127.0.0.1 in a background thread (for tests and benchmarks)."""

    def __init__(self, server: FakeFathomNet, port: int = 0):
        self.server = server
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: Optional[OSError] = None  # the port could not be bound
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.server.app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        try:
            self._loop.run_until_complete(site.start())
        except OSError as exc:
            self._error = exc
            self._started.set()
            return
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runner = runner
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/images/"

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a folder of images like FathomNet, with faults.")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--faults", choices=["none", "realistic"], default="none")
    args = parser.parse_args()
    faults = Faults.realistic() if args.faults == "realistic" else Faults()
    faults.latency_s = args.latency_ms / 1000
    print(f"serving {args.dir} at http://127.0.0.1:{args.port}/images/ faults={args.faults}", flush=True)
    web.run_app(FakeFathomNet(args.dir, faults).app, host="127.0.0.1", port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
