"""The slim inference files beside a checkpoint, and whether they are current.

Kept free of torch so that `status` and the driver can test completion in milliseconds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from fathompipe.layout import SlimFiles


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used; the message says why and what to do."""


class CorruptCheckpoint(CheckpointError):
    """The file is not a readable checkpoint at all (truncated copy, damaged bytes)."""


def fingerprint(path: Path) -> Dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_encoder_overrides(path: Optional[str | Path]) -> Dict[str, Any]:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--encoder-config {path}: {exc}") from None
    keep = ("num_attention_heads", "layer_norm_eps", "hidden_act", "layerscale_value", "qkv_bias", "use_swiglu_ffn")
    return {k: data[k] for k in keep if k in data}


def write_meta(slim: SlimFiles, meta: Dict[str, Any]) -> None:
    """Written last by the export: its presence means the weights beside it are complete."""
    from fathompipe import atomic
    atomic.write_json(slim.meta, meta)


def read_meta(slim: SlimFiles) -> Dict[str, Any]:
    """The export's metadata: `spec` (the architecture's ModelSpec fields, class names included), `source`
    (the checkpoint's size and mtime), `encoder_config`, and counts."""
    return json.loads(slim.meta.read_text())


def slim_is_current(checkpoint: Path, encoder_config: Optional[str | Path] = None) -> bool:
    """True when the slim files exist and were exported from this very file with these settings."""
    slim = SlimFiles.beside(checkpoint)
    if not (checkpoint.exists() and slim.meta.exists() and slim.weights.exists()):
        return False
    try:
        meta = read_meta(slim)
    except ValueError:
        return False
    return meta.get("source") == fingerprint(checkpoint) and \
        meta.get("encoder_config") == load_encoder_overrides(encoder_config)
