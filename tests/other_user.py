"""A second Unix user on this machine, for tests of what another user of a shared node can reach.

Created with useradd (no home, no login shell) and removed afterwards; needs root. Its probes run with
/usr/bin/python3 and the standard library only, as an unprivileged user could, and read their
arguments from stdin (a command line is visible to every user in /proc).
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Set, Tuple

import psutil
import pytest

from conftest import IN_CI

PYTHON = "/usr/bin/python3"


def need_root() -> None:
    """Root-only tests skip only outside CI: CI runs as root and must run them."""
    if os.geteuid() == 0 and shutil.which("useradd") and os.path.exists(PYTHON):
        return
    why = "needs root, useradd and /usr/bin/python3 to create and act as a second user"
    if IN_CI:
        pytest.fail(f"CI must run this test: {why}")
    pytest.skip(why)


class OtherUser:
    def __init__(self, name: str) -> None:
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid

    def python(self, code: str, data: Dict[str, Any], timeout: float = 60) -> Dict[str, Any]:
        """Run `code` as this user; it reads `data` as JSON from stdin and prints one JSON object."""
        proc = subprocess.run([PYTHON, "-I", "-c", code], input=json.dumps(data), capture_output=True, text=True,
                              timeout=timeout, user=self.uid, group=self.gid, extra_groups=[], cwd="/",
                              env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"})
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@contextmanager
def other_user() -> Iterator[OtherUser]:
    name = f"fp{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield OtherUser(name)
    finally:
        for p in psutil.process_iter(["username"]):
            if p.info["username"] == name:
                p.kill()
        subprocess.run(["userdel", name], check=True)


def listeners(pid: int) -> Tuple[Set[int], Set[str], List[int]]:
    """TCP ports and Unix socket paths on which `pid` or any of its descendants listens, and their pids."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    ports: Set[int] = set()
    paths: Set[str] = set()
    for p in procs:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                ports.add(c.laddr.port)
        for c in p.net_connections(kind="unix"):
            if c.laddr:
                paths.add(c.laddr)
    return ports, paths, [p.pid for p in procs]


# What another user tries, with nothing but the standard library: every port and socket of the App's
# processes, FiftyOne's version endpoint, GraphQL, a page, a token guessed wrong, a MongoDB hello on the
# database socket, the socket's directory, and the App's command line and environment.
PROBE = r'''
import errno, json, os, socket, struct, sys, urllib.request, urllib.error
args = json.load(sys.stdin)
out = {"http": {}, "unix": {}}

def http(url, body=None):
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=20).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return type(e).__name__

for port in args["ports"]:
    base = f"http://127.0.0.1:{port}"
    for what, url, body in [("page", base + "/", None), ("version", base + "/fiftyone", None),
                            ("dataset", base + "/datasets/" + args["dataset"], None),
                            ("guessed token", base + "/?token=" + "A" * 43, None),
                            ("graphql", base + "/graphql", b'{"query": "{ estimatedDatasetCount }"}')]:
        out["http"][f"{port} {what}"] = http(url, body)

hello = {"hello": 1, "$db": "admin"}
def bson(doc):  # just enough BSON for {"hello": 1, "$db": "admin"}
    body = b"\x10hello\x00" + struct.pack("<i", 1) + b"\x02$db\x00" + struct.pack("<i", 6) + b"admin\x00"
    return struct.pack("<i", len(body) + 5) + body + b"\x00"
msg = struct.pack("<I", 0) + b"\x00" + bson(hello)
packet = struct.pack("<iiii", 16 + len(msg), 1, 0, 2013) + msg
for path in args["sockets"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        s.sendall(packet)
        out["unix"][path] = "answered %d bytes" % len(s.recv(1 << 16))
    except OSError as e:
        out["unix"][path] = errno.errorcode.get(e.errno, type(e).__name__)
    finally:
        s.close()
try:
    os.listdir(args["state"])
    out["state_dir"] = "listed"
except OSError as e:
    out["state_dir"] = errno.errorcode.get(e.errno, "?")
try:
    open(f"/proc/{args['pid']}/environ", "rb").read()
    out["environ"] = "read"
except OSError as e:
    out["environ"] = errno.errorcode.get(e.errno, "?")
cmdlines = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read())
        except OSError:
            pass
out["cmdlines_read"] = len(cmdlines)
out["token_in_cmdlines"] = any(args["token"].encode() in c for c in cmdlines)
print(json.dumps(out))
'''
