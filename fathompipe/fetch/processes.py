"""One download process per CPU the job may use; the parent alone writes the records (signals forwarded)."""
from __future__ import annotations

import os
import signal
import sys
import multiprocessing as mp
import threading
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import List


from fathompipe.annotations import Image
from fathompipe.config import DownloadConfig
from fathompipe.fetch.client import Downloader, Report

MIN_IMAGES_PER_PROCESS = 16  # below this a shard is not worth another process


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
