"""The winner's weights: open its Lightning checkpoint safely, verify it against the architecture, export the
slim inference files beside it, and load the model from them (the loading half of the checkpoint stage, which
inference uses without importing the stage).

The 16 GB file is a pickle from Google Drive, so it is opened with `weights_only=True` and an
explicit allowlist of the globals a Lightning checkpoint needs; nothing in the file executes. Any
other global (another Lightning version's callback or loop state, a numpy scalar in a metric) gets
an inert stand-in that only records its arguments where inference never looks, and is refused inside
`state_dict` or `hyper_parameters`. A global from a module torch never unpickles (`os`, `sys`, `posix`,
`nt`: its weights-only loader blocks them whatever the allowlist) refuses the whole file wherever it
sits; the message names the global and where it sits (`callbacks['...']`), found by a second, inert
reading of the pickle.
"""
from __future__ import annotations

import collections
import io
import pickle
import re
import time
import typing
import zipfile

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode
from safetensors.torch import load_file, save_file

from fathompipe import atomic
from fathompipe.layout import SlimFiles
from fathompipe.model.slim import (CheckpointError, CorruptCheckpoint, fingerprint, load_encoder_overrides,
                                   slim_is_current, read_meta, write_meta)
from fathompipe.model.winner import CheckpointMismatch, FathomNetClassifier, ModelSpec, check_keys, inference_state_dict

# What a Lightning checkpoint with OmegaConf hyper-parameters pickles, and nothing more.
ALLOWED_GLOBALS: List[Any] = [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, dict, list,
                              int, collections.defaultdict]
_ALLOWED_NAMES = {f"{g.__module__}.{g.__qualname__}" if hasattr(g, "__qualname__") else str(g) for g in ALLOWED_GLOBALS}

class Inert:
    """Stands in for a pickle global outside the allowlist: calling, constructing or restoring it only records
    the arguments, so nothing from the file runs. Tolerated where inference never looks (optimizer, callback
    and loop state); refused inside `state_dict` or `hyper_parameters`."""

    global_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict-like globals get their items set
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # list-like globals get appended to
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("values", []).extend(values)


def inert_stand_ins(names: List[str]) -> List[Tuple[type, str]]:
    """One Inert subclass per unknown global name, in torch's (object, "module.name") allowlist form."""
    return [(type(f"Inert[{name}]", (Inert,), {"global_name": name}), name) for name in names]


def _inert_inside(value: Any, where: str, seen: Optional[set] = None,
                  wanted: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """(global name, path) of the first stand-in inside `value` (dicts, lists, OmegaConf containers, and what other
    stand-ins recorded), else None; with `wanted`, of the first stand-in for that global."""
    seen = set() if seen is None else seen
    if id(value) in seen or isinstance(value, (torch.Tensor, str, bytes, int, float, bool, type(None))):
        return None
    seen.add(id(value))
    if isinstance(value, Inert):
        if wanted is None or value.global_name == wanted:
            return value.global_name, where
        recorded = value.__dict__
        for key, item in [*recorded.get("items", {}).items(), *enumerate(recorded.get("values", [])),
                          *(("args", a) for a in recorded.get("args", ())), ("state", recorded.get("state"))]:
            found = _inert_inside(item, where if key in ("args", "state") else f"{where}[{key!r}]", seen, wanted)
            if found:
                return found
        return None
    if isinstance(value, (DictConfig, ListConfig)):
        value = value._content  # private (omegaconf 2.4.0): the raw nodes, so no interpolation or resolver runs
    if isinstance(value, AnyNode):
        value = value._value()  # private (omegaconf 2.4.0): the stored value, unresolved
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple, set)):
        items = list(enumerate(value))
    else:
        items = list(getattr(value, "__dict__", {}).items())
    for key, item in items:
        found = _inert_inside(item, f"{where}[{key!r}]", seen, wanted)
        if found:
            return found
    return None


class _InertReading(pickle.Unpickler):
    """Reads a checkpoint's pickle with EVERY global replaced by an inert stand-in and no tensor data: only to
    say where a global sits. Nothing from the file can run: `find_class` never returns a real object."""

    def find_class(self, module: str, name: str) -> type:
        return type(f"Inert[{module}.{name}]", (Inert,), {"global_name": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> None:  # tensor storages: not read
        return None


def where_global_sits(path: Path, name: str) -> Optional[str]:
    """The place of global `name` in a torch.save checkpoint, e.g. `callbacks['ModelCheckpoint']`; None if unknown."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            top = _InertReading(io.BytesIO(archive.read(pkl))).load()
    except Exception:  # a damaged file: the message then says only what torch said
        return None
    return _place(top, name)


def _place(top: Any, name: str) -> Optional[str]:
    """Where the stand-in for global `name` sits in a loaded checkpoint, as `callbacks['x']`."""
    for key, value in (top.items() if isinstance(top, dict) else [("", top)]):
        found = _inert_inside(value, str(key), wanted=name)
        if found:
            return found[1]
    return None


def load_lightning_checkpoint(path: Path) -> Dict[str, Any]:
    """torch.load with weights_only and the allowlist; memory-mapped (nothing read until used).

    A global outside the allowlist (a newer Lightning's callback state, a numpy scalar in a logger's
    metrics) is given an inert stand-in, so nothing runs; it is refused if it sits in `state_dict` or
    `hyper_parameters`, which inference uses.
    """
    try:
        unknown = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                   if g not in _ALLOWED_NAMES]
        with torch.serialization.safe_globals([*ALLOWED_GLOBALS, *inert_stand_ins(unknown)]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()), str(exc).splitlines()[0])
        named = re.search(r"GLOBAL (\S+)", detail)
        sits = where_global_sits(path, named.group(1)) if named else None
        place = f", at {sits}" if sits else ""
        blocked = " (its module is one torch never unpickles from a checkpoint, wherever it sits)" \
            if "is blocked" in detail else ""
        raise CheckpointError(f"{path}: refused to load the whole file: it holds the pickle global "
                              f"{named.group(1) if named else '(unknown)'}{place}{blocked}. torch said: {detail} "
                              f"Nothing from it was executed. Use the winner's original checkpoint.") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise CorruptCheckpoint(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]}); the file is "
                                f"truncated or corrupt") from None
    if not isinstance(ckpt, dict):
        raise CheckpointMismatch(f"{path}: not a Lightning checkpoint: the top level is not a dict")
    for key in ("state_dict", "hyper_parameters"):
        found = _inert_inside(ckpt.get(key), key)
        if found:
            raise CheckpointError(f"{path}: refused to load: {found[1]} holds the pickle global {found[0]}, outside "
                                  f"the allowlist, where inference would use it. Nothing from it was executed. Use "
                                  f"the winner's original checkpoint.")
    if unknown:
        listed = ", ".join(f"{name} at {_place(ckpt, name) or '?'}" for name in sorted(unknown))
        print(f"{path}: {len(unknown)} pickle global(s) outside the allowlist, not needed for inference, "
              f"loaded as inert stand-ins (nothing from them ran): {listed}", flush=True)
    return ckpt


def spec_from_checkpoint(ckpt: Dict[str, Any], encoder_overrides: Optional[Dict[str, Any]] = None) -> ModelSpec:
    hp = ckpt.get("hyper_parameters")
    if hp is None or "state_dict" not in ckpt:
        raise CheckpointMismatch("not a Lightning checkpoint: no 'state_dict' or 'hyper_parameters'")
    id2name = hp["category_id2name"]
    names = [id2name[i] for i in range(len(id2name))]
    crop = int(hp.get("obj_encoder_size", [256, 256])[0])
    scales = [int(s) for s in hp.get("env_img_crop_scale_list", [3, 5, -1])]
    return ModelSpec.infer(ckpt["state_dict"], names, crop, scales, encoder_overrides)

def check_fits(spec: ModelSpec, state_dict: Dict[str, torch.Tensor]) -> None:
    """Strict key and shape check against the architecture, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = FathomNetClassifier(spec)
    check_keys(model.checkpoint_shapes(), state_dict)

def export_slim(checkpoint: Path, encoder_config: Optional[str | Path] = None, force: bool = False) -> SlimFiles:
    """Verify `checkpoint` and write (or reuse) its slim inference files."""
    slim = SlimFiles.beside(checkpoint)
    if not force and slim_is_current(checkpoint, encoder_config):
        print(f"slim weights up to date: {slim.weights}")
        return slim
    overrides = load_encoder_overrides(encoder_config)
    t0 = time.monotonic()
    ckpt = load_lightning_checkpoint(checkpoint)
    spec = spec_from_checkpoint(ckpt, overrides)
    weights = inference_state_dict(ckpt["state_dict"])
    check_fits(spec, weights)
    n_params = sum(v.numel() for v in ckpt["state_dict"].values())
    save_weights = {k: v.contiguous() for k, v in weights.items()}
    with atomic.atomic_path(slim.weights) as tmp:
        save_file(save_weights, str(tmp))
    meta = {"source": fingerprint(checkpoint), "source_path": str(checkpoint), "encoder_config": overrides,
            "spec": spec.__dict__,
            "state_dict_keys": len(ckpt["state_dict"]), "parameters": n_params,
            "inference_keys": len(weights), "lightning_version": ckpt.get("pytorch-lightning_version")}
    write_meta(slim, meta)
    print(f"verified {checkpoint}: {len(ckpt['state_dict'])} tensors, {n_params / 1e9:.3f}e9 parameters; "
          f"exported {len(weights)} inference tensors to {slim.weights} in {time.monotonic() - t0:.1f}s")
    return slim

def load_model(slim: SlimFiles, device: torch.device | str = "cpu") -> Tuple[FathomNetClassifier, ModelSpec]:
    """Build the model from the slim files: seconds, whatever the original checkpoint's size."""
    spec = ModelSpec(**read_meta(slim)["spec"])
    with torch.device("meta"):
        model = FathomNetClassifier(spec)
    state = load_file(str(slim.weights), device=str(device))
    model.load_weights(state, assign=True)
    return model.eval(), spec
