"""The options an inference output's part files were computed with (OUT.parts/options.json), so that a rerun into
the same output with other options cannot mix incomparable batches.

Recorded: what changes a part's content or which ROIs it holds. precision (the logits), batch_size and shards
(batch i of shard s is other ROIs when either changes: ROIs would be skipped or repeated), embeddings (whether
parts hold them). Not recorded: resize (both paths give identical crops, tests/test_resize.py), device (fp32 on
the CPU and on a GPU agree within rounding; precision, which differs between them by default, is recorded),
num_workers. A rerun with another value is refused with what to do, except embeddings=false after parts with
embeddings: those parts serve it (the merge leaves their embeddings out) and the record becomes false, since
the parts written from then on have none.
"""
from __future__ import annotations

import fcntl
import json
from typing import Dict

from fathompipe import atomic
from fathompipe.config import InferConfig
from fathompipe.layout import OutputFiles

FLAGS = {"precision": "--precision", "batch_size": "--batch-size", "shards": "--num-shards"}
WHY = {"precision": "merge logits computed at two precisions",
       "batch_size": "skip or repeat ROIs (the plan's batches would hold other ROIs)",
       "shards": "skip or repeat ROIs (the shards would hold other images)",
       "embeddings": "leave the earlier batches without embeddings"}


class PartOptionsMismatch(RuntimeError):
    """A rerun asks for other result-changing options than the parts already in its output."""


def part_options(options: InferConfig, precision: str) -> Dict[str, object]:
    """What options.json records for a run; `precision` is the resolved one (auto -> fp16 on a GPU, fp32 on the CPU)."""
    return {"precision": precision, "batch_size": options.batch_size, "shards": options.shards,
            "embeddings": options.embeddings}


def _show(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _flag(key: str, value: object) -> str:
    if key == "embeddings":
        return "--embeddings" if value else "--no-embeddings"
    return f"{FLAGS[key]} {value}"


def check_part_options(out: OutputFiles, wanted: Dict[str, object]) -> None:
    """Refuse (PartOptionsMismatch) when OUT.parts holds batches computed with other options; else record `wanted`.
    Under the merge lock, so the shards of one array starting together agree."""
    out.parts.mkdir(parents=True, exist_ok=True)
    record = out.parts / "options.json"
    with open(out.merge_lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recorded = json.loads(record.read_text()) if record.exists() else {}
        if out.all_parts():  # no parts yet (or a folder from before options were recorded): nothing to mix
            for key, new in wanted.items():
                old = recorded.get(key, new)
                if old == new or (key == "embeddings" and old is True and new is False):
                    continue
                raise PartOptionsMismatch(
                    f"{out.parts} holds batches computed with infer.{key}={_show(old)}, and this run asks for "
                    f"{_show(new)}: continuing would {WHY[key]}. Rerun with infer.{key}={_show(old)} "
                    f"({_flag(key, old)}) to finish that run, or delete {out.parts} to compute every batch with "
                    f"{_show(new)}.")
        if recorded != wanted:
            atomic.write_json(record, wanted)
