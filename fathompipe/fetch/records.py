"""What happened to each image of a shard, and the shard's summary line; the record format of the JSONL files."""
from __future__ import annotations

from dataclasses import dataclass




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
