"""The download stage against a real loopback HTTP server that misbehaves like real servers do."""
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from conftest import DATA, PARITY, ROOT
from fathompipe.annotations import load_coco
from fathompipe.config import DownloadConfig, SplitSource
from fathompipe.download import download_shard
from fathompipe.fetch.client import retry_after_seconds
from fathompipe.layout import ShardFiles
from fathompipe.jobs import DownloadJob
from support.fakeserver import FakeFathomNet, Faults, ServerThread
from support.synthetic import synthetic_png
from pipeline_helpers import cli, write_profile

FAST = dict(backoff_base_s=0.02, backoff_max_s=2.0, connect_timeout_s=5, read_timeout_s=5)


def leftovers(images_dir: Path) -> list:
    return [p.name for p in images_dir.iterdir() if p.name.startswith(".") and p.name != ".fathompipe"]


def test_realistic_faults_leave_every_servable_image_intact(tmp_path, fake_fathomnet):
    server, ann = fake_fathomnet(DATA / "dataset_test.json", Faults.realistic(retry_after_s=1))
    images = tmp_path / "images"
    summary = download_shard(DownloadJob(SplitSource(ann, images),
                                         DownloadConfig(num_shards=1, max_attempts=10, **FAST)), progress=False)
    ds = load_coco(ann)
    missing = {im.file_name for im in ds.images if server.is_missing(im.file_name)}
    assert summary.complete and summary.total == 325
    assert summary.missing == len(missing) > 0 and summary.ok == 325 - len(missing)
    for im in ds.images:
        local = images / im.file_name
        if im.file_name in missing:
            assert not local.exists()
        else:
            assert local.read_bytes() == (server.directory / im.file_name).read_bytes(), im.file_name
    assert leftovers(images) == []
    files = ShardFiles.of(images / ".fathompipe", "srv", 0, 1)
    records = files.load_records()
    assert {r.status for r in records.values()} == {"ok", "missing"}
    assert all(r.error == "HTTP 404" for r in records.values() if r.status == "missing")
    assert all(len(r.sha256) == 64 for r in records.values() if r.status == "ok")
    assert json.loads(files.marker.read_text())["ok"] == summary.ok
    assert sum(server.requests.values()) > 325  # faults were really injected and retried

    before = dict(server.requests)
    again = download_shard(DownloadJob(SplitSource(ann, images),
                                       DownloadConfig(num_shards=1, max_attempts=10, **FAST)), progress=False)
    assert again.complete and again.downloaded == 0
    asked_again = {n for n, c in server.requests.items() if c != before.get(n, 0)}
    assert asked_again <= missing  # nothing on disk was requested again


def test_transient_failures_are_recorded_and_fail_the_shard(tmp_path, fake_fathomnet):
    server, ann = fake_fathomnet(DATA / "dataset_test.json", Faults(http_503=1.0, retry_after_s=0), limit=4)
    summary = download_shard(DownloadJob(SplitSource(ann, tmp_path / "img"),
                                         DownloadConfig(num_shards=1, max_attempts=3, **FAST)), progress=False)
    assert not summary.complete and summary.failed == 4
    files = ShardFiles.of(tmp_path / "img" / ".fathompipe", "srv", 0, 1)
    assert not files.marker.exists()
    recs = files.load_records().values()
    assert all(r.status == "failed" and r.attempts == 3 and r.error == "HTTP 503" for r in recs)
    assert set(server.requests.values()) == {3}


class Scripted:
    """A server whose nth answer per path is scripted: for Retry-After and stall timing."""

    def __init__(self, body: bytes, script: list):
        self.body, self.script, self.times = body, script, []
        self.app = web.Application()
        self.app.router.add_get("/images/{name}", self.handle)

    async def handle(self, request):
        self.times.append(time.monotonic())
        action = self.script[len(self.times) - 1] if len(self.times) <= len(self.script) else "ok"
        if action == "429":
            return web.Response(status=429, headers={"Retry-After": "1"})
        resp = web.StreamResponse()
        resp.content_length = len(self.body)
        await resp.prepare(request)
        if action == "stall":
            await resp.write(self.body[:100])
            await asyncio.sleep(4)
        await resp.write(self.body)
        return resp


def _one_image(tmp_path: Path, base_url: str) -> Path:
    ann = tmp_path / "one.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "width": 64, "height": 48, "file_name": "a.png",
                                           "coco_url": base_url + "a.png"}], "annotations": [],
                               "categories": [{"id": 1, "name": "x"}]}))
    return ann


@pytest.mark.parametrize("script, check", [(["429"], "retry_after"), (["stall"], "read_timeout")])
def test_retry_after_and_read_timeout(tmp_path, script, check):
    scripted = Scripted(synthetic_png(64, 48, 1), script)
    with ServerThread(scripted) as st:
        ann = _one_image(tmp_path, st.base_url)
        t0 = time.monotonic()
        opts = DownloadConfig(num_shards=1, backoff_base_s=0.01, read_timeout_s=0.5, max_attempts=3)
        summary = download_shard(DownloadJob(SplitSource(ann, tmp_path / "img"), opts), progress=False)
        elapsed = time.monotonic() - t0
    assert summary.complete and (tmp_path / "img/a.png").read_bytes() == scripted.body
    gap = scripted.times[1] - scripted.times[0]
    if check == "retry_after":
        assert gap >= 0.95  # waited what the server asked, not the 10 ms backoff
    else:
        assert 0.4 <= gap < 3 and elapsed < 5  # gave up on the stalled body after ~0.5 s


def test_existing_files_adopted_or_replaced_and_image_id_naming(tmp_path, fake_fathomnet):
    server, ann = fake_fathomnet(DATA / "dataset_test.json", limit=6)
    ds = load_coco(ann)
    ims = sorted(ds.images, key=lambda i: i.id)
    images = tmp_path / "img"
    images.mkdir()
    good, bad = ims[0], ims[1]
    (images / f"{good.id}.png").write_bytes((server.directory / good.file_name).read_bytes())  # another tool's
    (images / f"{bad.id}.png").write_bytes(b"\x89PNG truncated")
    summary = download_shard(DownloadJob(SplitSource(ann, images, naming="image_id"),
                                         DownloadConfig(num_shards=1, **FAST)), progress=False)
    assert summary.complete and summary.downloaded == 5
    assert server.requests[good.file_name] == 0 and server.requests[bad.file_name] == 1
    for im in ims:
        assert (images / f"{im.id}.png").read_bytes() == (server.directory / im.file_name).read_bytes()
    recs = ShardFiles.of(images / ".fathompipe", "srv", 0, 1).load_records()
    assert recs[good.id].source == "adopted"


def test_sigterm_mid_shard_then_rerun_completes_without_refetching(tmp_path, fake_fathomnet):
    server, ann = fake_fathomnet(DATA / "dataset_test.json", Faults(latency_s=0.2), limit=60)
    images = tmp_path / "img"
    cmd = [sys.executable, "-m", "fathompipe.download", "--annotations", str(ann), "--images-dir", str(images),
           "--concurrency", "4", "--per-host", "4", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = images / ".fathompipe" / "srv-00000-of-00001.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not records.exists() or len(records.read_text().splitlines()) < 8):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "INTERRUPTED" in out
    assert leftovers(images) == []  # no partial file
    first = {p.name for p in images.glob("*.png")}
    assert 8 <= len(first) < 60
    for name in first:  # whatever is there is complete
        assert (images / name).read_bytes() == (server.directory / name).read_bytes()
    before = dict(server.requests)
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert all(server.requests[n] == before[n] for n in first)  # finished images never fetched again
    assert len(list(images.glob("*.png"))) == 60


def test_cli_bad_annotation_file_is_one_clear_error(tmp_path, run_cli):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [{"id": 1}], "categories": []}')
    proc = run_cli("fathompipe.download", "--annotations", str(bad), "--images-dir", str(tmp_path / "i"))
    assert proc.returncode == 2
    assert "bad.json" in proc.stderr and "image_id" in proc.stderr and "Traceback" not in proc.stderr


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert 0 <= retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") < 1


class Forbidden(FakeFathomNet):
    """A proxy or CDN that answers 403 for the files in `forbidden`."""

    forbidden: set = set()

    async def handle(self, request):
        name = request.match_info["name"]
        if name in self.forbidden:
            self.requests[name] += 1
            return web.Response(status=403, text="forbidden")
        return await super().handle(request)


def test_403_is_retried_then_the_shard_is_incomplete_and_status_names_it(tmp_path, fake_fathomnet, parity_copy):
    server, ann = fake_fathomnet(PARITY / "dataset.json", server_class=Forbidden, source_dir=PARITY / "images")
    victim = json.loads(ann.read_text())["images"][1]["file_name"]  # image 2: shard 1 of 3
    Forbidden.forbidden = {victim}
    summary = download_shard(DownloadJob(SplitSource(ann, tmp_path / "direct"),
                                         DownloadConfig(num_shards=3, max_attempts=3, **FAST), shard=1), progress=False)
    files = ShardFiles.of(tmp_path / "direct" / ".fathompipe", "srv", 1, 3)
    assert not summary.complete and summary.failed == 1 and summary.missing == 0 and not files.marker.exists()
    rec = [r for r in files.load_records().values() if r.status == "failed"][0]
    assert rec.error == "HTTP 403" and rec.attempts == 3 and server.requests[victim] == 3  # bounded retries

    profile = write_profile(tmp_path, ann, parity_copy, "local")
    assert cli("submit", "--profile", str(profile)).returncode == 1
    status = cli("status", "--run-dir", str(tmp_path / "run"))
    assert status.returncode == 1 and "download test/1" in status.stdout and "causes: HTTP 403 x1" in status.stdout
    assert not list((tmp_path / "run" / "download").glob("*00001-of-00003.done"))
