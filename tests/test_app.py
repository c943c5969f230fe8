"""`python -m fathompipe.app`: the FiftyOne App for the user who started it only, until stopped.

One App for the module, started exactly as the evaluate stage and the demo print it (fiftyone_io.app_command),
on a private database of its own (a temporary data directory). As root, a second Unix user is created and
shown refused everywhere; a client that disconnects does not stop the App; stopping it leaves nothing behind.
The token gate's decisions are also tested alone, without FiftyOne.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List
from urllib.parse import urlsplit

import psutil
import pytest
import requests

from conftest import ROOT
from fathompipe.app import TokenGate
from fathompipe.evaluation import fiftyone_io
from fathompipe.evaluation.private_database import ManagedMongod, state_dir
from other_user import PROBE, listeners, need_root, other_user

DATASET, VIEW = "app-review", "app-review-disagreements"
TOKEN = "t" * 43


# --- the gate alone ---------------------------------------------------------------------------------------------

def call(scope: Dict[str, object]) -> List[Dict[str, object]]:
    sent: List[Dict[str, object]] = []

    async def app(scope, receive, send):
        await send({"type": "app", "path": scope.get("path")})

    async def receive():
        return {}

    async def send(message):
        sent.append(message)

    asyncio.run(TokenGate(app, TOKEN, "fathompipe-app-5151")(scope, receive, send))
    return sent


def http(path: str, query: str = "", headers=(), method: str = "GET", kind: str = "http") -> Dict[str, object]:
    return {"type": kind, "method": method, "path": path, "raw_path": path.encode(), "query_string": query.encode(),
            "headers": [(k.encode(), v.encode()) for k, v in headers]}


def test_gate_token_in_url_becomes_a_cookie_everything_else_is_refused():
    start = call(http("/datasets/d", f"view=v&token={TOKEN}"))[0]
    assert start["status"] == 302
    headers = dict(start["headers"])
    assert headers[b"location"] == b"/datasets/d?view=v"  # the token leaves the address bar
    assert headers[b"set-cookie"] == f"fathompipe-app-5151={TOKEN}; Path=/; HttpOnly; SameSite=Strict".encode()
    for allowed in [http("/graphql", headers=[("cookie", f"other=1; fathompipe-app-5151={TOKEN}")], method="POST"),
                    http("/events", headers=[("authorization", f"token {TOKEN}")], method="POST"),
                    http("/graphql", f"token={TOKEN}", method="POST"),
                    {"type": "lifespan"}]:
        assert call(allowed)[0]["type"] == "app", allowed
    for refused in [http("/"), http("/", f"token={TOKEN[:-1]}x"), http("/media", "filepath=/etc/passwd"),
                    http("/graphql", headers=[("cookie", f"fathompipe-app-5152={TOKEN}")], method="POST"),
                    http("/", headers=[("authorization", "token ")])]:
        assert call(refused)[0]["status"] == 403, refused
    assert call(http("/ws", kind="websocket")) == [{"type": "websocket.close", "code": 1008}]


# --- one real App for the rest of the module ---------------------------------------------------------------------

@dataclass
class App:
    proc: subprocess.Popen
    data_dir: Path
    output: List[str] = field(default_factory=list)
    url: str = ""

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port)  # type: ignore[arg-type]

    @property
    def token(self) -> str:
        return self.url.rsplit("token=", 1)[1]

    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def environment() -> Dict[str, str]:
    """The user's environment: no FIFTYONE_DATABASE_URI, so fathompipe's private database is used."""
    return {k: v for k, v in os.environ.items() if k not in ("FIFTYONE_DATABASE_URI", "FIFTYONE_DATABASE_NAME")}


CREATE = """
import sys
import fathompipe.database
print(fathompipe.database.use(sys.argv[1]), flush=True)  # as a researcher's script joins the private database
import fiftyone as fo
ds = fo.Dataset(sys.argv[2], persistent=True)
ds.add_samples([fo.Sample(filepath=f"/nonexistent/{i}.png", ground_truth=fo.Detections(
    detections=[fo.Detection(label="Fish", bounding_box=[0.1, 0.1, 0.3, 0.3])])) for i in range(3)])
ds.save_view(sys.argv[3], ds.limit(2))
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory, private_fiftyone_database):
    if not private_fiftyone_database:
        pytest.skip("FiftyOne's mongod is not installed (bash setup.sh)")
    data_dir = tmp_path_factory.mktemp("app") / "db"
    made = subprocess.run([sys.executable, "-c", CREATE, str(data_dir), DATASET, VIEW], env=environment(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    assert "fathompipe's private database" in made.stdout
    assert not ManagedMongod(data_dir).answers()  # that session was the last user: mongod stopped with it

    argv = shlex.split(fiftyone_io.app_command(DATASET, VIEW, str(data_dir)))
    assert argv[:3] == ["python", "-m", "fathompipe.app"]
    proc = subprocess.Popen([sys.executable, *argv[1:]], env=environment(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    running = App(proc, data_dir)
    reader = threading.Thread(target=lambda: running.output.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while not running.url and proc.poll() is None and time.monotonic() < deadline:
        found = [m for line in running.output for m in re.findall(r"open:\s+(\S+)", line)]
        running.url = found[0] if found else ""
        time.sleep(0.2)
    assert running.url, "".join(running.output)
    yield running
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(state_dir(data_dir), ignore_errors=True)  # its socket directory in /tmp


def test_the_printed_url_opens_the_saved_view_for_its_owner(app):
    out = "".join(app.output)
    assert f"ssh -N -L {app.port}:127.0.0.1:{app.port} " in out and "Ctrl-C" in out
    assert urlsplit(app.url).path == f"/datasets/{DATASET}" and f"view={VIEW}" in app.url
    browser = requests.Session()
    first = browser.get(app.url, allow_redirects=False, timeout=30)
    assert first.status_code == 302 and "token" not in first.headers["location"]
    page = browser.get(app.url, timeout=30)  # the page, with the cookie from now on
    assert page.status_code == 200
    # seeded with what the review views show on each patch (truth, prediction, confidence, mistakenness)
    assert "shownLabelAttributes-" in page.text and "mistakenness" in page.text
    query = {"query": f'{{ savedViews(datasetName: "{DATASET}") {{ name }} estimatedDatasetCount }}'}
    answer = browser.post(app.base() + "/graphql", json=query, timeout=30).json()["data"]
    assert answer == {"savedViews": [{"name": VIEW}], "estimatedDatasetCount": 1}


def test_without_the_token_the_app_refuses(app):
    for method, path in [("GET", "/"), ("GET", "/fiftyone"), ("GET", f"/datasets/{DATASET}"),
                         ("POST", "/graphql"), ("POST", "/events"), ("GET", "/media?filepath=/etc/hostname"),
                         ("GET", "/?token=" + "x" * 43)]:
        assert requests.request(method, app.base() + path, timeout=30).status_code == 403, path
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert requests.get(app.base() + "/anything", headers=upgrade, timeout=30).status_code == 403


def test_a_client_that_disconnects_does_not_stop_the_app(app):
    """FiftyOne's `.wait()` returns 3 s after the last App client leaves; this command keeps serving."""
    listen = {"initializer": {"dataset": DATASET, "view": VIEW}, "events": ["state_update"],
              "subscription": "test-client"}
    with requests.post(app.base() + "/events", json=listen, stream=True, timeout=30,
                       headers={"Authorization": f"token {app.token}"}) as stream:
        assert stream.status_code == 200
        assert next(stream.iter_lines(decode_unicode=True)).startswith("event: state_update")
    time.sleep(6)  # twice FiftyOne's 3 s
    assert app.proc.poll() is None
    assert requests.get(app.base() + "/fiftyone", headers={"Authorization": f"token {app.token}"},
                        timeout=30).json()["version"]


def test_another_user_of_the_node_is_refused_everywhere(app):
    need_root()
    ports, sockets, _ = listeners(app.proc.pid)
    database = ManagedMongod(app.data_dir)
    assert ports == {app.port} and sockets == {str(database.socket)}  # mongod: its socket only, no TCP port
    with other_user() as other:
        seen = other.python(PROBE, {"ports": sorted(ports), "sockets": sorted(sockets), "dataset": DATASET,
                                    "state": str(database.state), "pid": app.proc.pid, "token": app.token})
    print(other.name, seen)
    assert set(seen["http"].values()) == {403}, seen["http"]  # with the port found, and every page, guessed or not
    assert seen["unix"] == {str(database.socket): "EACCES"}
    assert seen["state_dir"] == "EACCES" and seen["environ"] in ("EACCES", "EPERM")
    assert seen["cmdlines_read"] > 10 and not seen["token_in_cmdlines"]
    # the owner, through the same socket
    from pymongo import MongoClient
    with MongoClient(database.uri, serverSelectionTimeoutMS=10000) as client:
        assert client.admin.command("ping")["ok"] == 1


def test_stopping_it_leaves_no_process_behind(app):
    _, _, pids = listeners(app.proc.pid)
    assert len(pids) == 2  # the App and the mongod it started
    os.kill(app.proc.pid, signal.SIGTERM)
    assert app.proc.wait(60) == 0
    time.sleep(0.5)
    assert "FiftyOne App stopped." in "".join(app.output)
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left
    assert not ManagedMongod(app.data_dir).socket.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(app.base() + "/", timeout=5)
    state = ManagedMongod(app.data_dir).state
    written = [p for folder in (app.data_dir, state) for p in folder.rglob("*")
               if p.is_file() and app.token.encode() in p.read_bytes()]
    assert not written and "".join(app.output).count(app.token) == 1  # printed once, in the URL, and nowhere else
