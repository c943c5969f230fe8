"""Safe loading of the Lightning checkpoint and the slim inference export."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import PARITY
from fathompipe.model.slim import CheckpointError
from fathompipe.model.weights import export_slim, load_lightning_checkpoint, load_model
from fathompipe.layout import SlimFiles
from fathompipe.model.slim import slim_is_current
from fathompipe.model.winner import CheckpointMismatch

ENCODER = PARITY / "tiny_dinov2_config.json"


class Payload:
    """Unpickling this would create a file: proof of code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Recorder:
    """A stand-in for a newer library's callback state: a class the allowlist does not know."""

    def __init__(self):
        self.best = np.float64(0.5)  # a numpy scalar, as a metric tracker keeps it


def _with(tmp_path: Path, where: str, value: object) -> Path:
    ckpt = dict(load_lightning_checkpoint(PARITY / "model.ckpt"))
    if where == "state_dict":
        ckpt["state_dict"] = {**ckpt["state_dict"], "extra": value}
    elif where == "hyper_parameters":
        ckpt["hyper_parameters"] = {**dict(ckpt["hyper_parameters"]), "extra": value}
    else:
        ckpt[where] = {"extra": value}
    path = tmp_path / f"{where}.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("where", ["callbacks", "optimizer_states", "loops", "lr_schedulers"])
def test_unknown_globals_outside_the_weights_get_inert_stand_ins(tmp_path, capsys, parity_copy, where):
    marker = tmp_path / "pwned"
    path = _with(tmp_path, where, [Recorder(), np.int64(3), Payload(str(marker))])
    slim = export_slim(path, ENCODER)
    assert not marker.exists()  # the malicious reduce was recorded, never called
    out = capsys.readouterr().out
    assert "inert stand-ins" in out and "test_checkpoint.Recorder" in out and "open" in out
    got, want = load_file(str(slim.weights)), load_file(str(export_slim(parity_copy, ENCODER).weights))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # the same weights


@pytest.mark.parametrize("where", ["state_dict", "hyper_parameters"])
def test_unknown_global_where_inference_looks_is_refused_and_nothing_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    path = _with(tmp_path, where, Payload(str(marker)))
    with pytest.raises(CheckpointError) as exc:
        export_slim(path, ENCODER)
    msg = str(exc.value)
    assert f"{where}['extra'] holds the pickle global" in msg and "open" in msg
    assert "Nothing from it was executed" in msg
    assert not marker.exists()
    assert not SlimFiles.beside(path).meta.exists()


def test_missing_key_is_refused_naming_it(tmp_path):
    ckpt = dict(load_lightning_checkpoint(PARITY / "model.ckpt"))
    sd = dict(ckpt["state_dict"])
    del sd["intra_env_attn_module.256_5.layers.2.norm1.bias"]
    sd["classifier.extra.weight"] = torch.zeros(1)
    ckpt["state_dict"] = sd
    path = tmp_path / "broken.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointMismatch) as exc:
        export_slim(path, ENCODER)
    msg = str(exc.value)
    assert "1 missing: intra_env_attn_module.256_5.layers.2.norm1.bias" in msg
    assert "1 unexpected: classifier.extra.weight" in msg


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes((PARITY / "model.ckpt").read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="cut.ckpt: not a readable checkpoint.*truncated or corrupt"):
        export_slim(path, ENCODER)


def test_slim_export_is_reused_until_the_source_changes(parity_copy, capsys):
    slim = export_slim(parity_copy, ENCODER)
    first = slim.weights.stat().st_mtime_ns
    assert slim_is_current(parity_copy, ENCODER)
    export_slim(parity_copy, ENCODER)
    assert slim.weights.stat().st_mtime_ns == first and "up to date" in capsys.readouterr().out
    assert not slim_is_current(parity_copy, None)  # other head count: another model
    os.utime(parity_copy, ns=(first + 10**9, first + 10**9))
    assert not slim_is_current(parity_copy, ENCODER)
    export_slim(parity_copy, ENCODER)
    assert slim.weights.stat().st_mtime_ns != first


def test_slim_model_has_only_inference_weights_and_loads_strictly(parity_copy):
    slim = export_slim(parity_copy, ENCODER)
    model, spec = load_model(slim)
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.scales) == (32, 2, 4, [3, 5, -1])
    assert len(spec.class_names) == 79 and spec.class_names[12] == "Brisingida"
    from safetensors import safe_open
    with safe_open(str(slim.weights), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith(("hierarchical", "obj_proj_module")) for k in keys)
    assert len(keys) == 402  # 456 minus 18 object projections and 36 hierarchical heads


class Mirror:
    """A loopback HTTP mirror of the parity checkpoint (Google Drive is not reachable here)."""

    def __init__(self):
        from aiohttp import web

        body = (PARITY / "model.ckpt").read_bytes()

        async def handle(request: web.Request) -> web.Response:
            return web.Response(body=body)

        self.app = web.Application()
        self.app.router.add_get("/images/{name}", handle)


def test_missing_checkpoint_is_downloaded_from_a_mirror_url(tmp_path):
    from fathompipe.checkpoint import prepare
    from support.fakeserver import ServerThread

    with ServerThread(Mirror()) as st:
        target = tmp_path / "dl" / "last-002.ckpt"
        slim = prepare(target, url=st.base_url + "last-002.ckpt", encoder_config=ENCODER)
    assert target.read_bytes() == (PARITY / "model.ckpt").read_bytes() and slim.meta.exists()


def test_truncated_checkpoint_is_moved_aside_and_fetched_again(tmp_path):
    from fathompipe.checkpoint import prepare
    from support.fakeserver import ServerThread

    good = (PARITY / "model.ckpt").read_bytes()
    target = tmp_path / "last-002.ckpt"
    target.write_bytes(good[: len(good) // 2])
    with ServerThread(Mirror()) as st:
        slim = prepare(target, url=st.base_url + "last-002.ckpt", encoder_config=ENCODER)
    assert target.read_bytes() == good and slim.meta.exists()
    assert (tmp_path / "last-002.ckpt.corrupt").read_bytes() == good[: len(good) // 2]  # kept, never deleted


def test_truncated_checkpoint_without_a_reachable_source_is_one_clear_error(tmp_path):
    import socket

    from fathompipe.checkpoint import prepare

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = tmp_path / "last-002.ckpt"
    target.write_bytes((PARITY / "model.ckpt").read_bytes()[:100_000])
    with pytest.raises(CheckpointError) as err:
        prepare(target, url=f"http://127.0.0.1:{port}/last-002.ckpt", encoder_config=ENCODER)
    message = str(err.value)
    assert "truncated or corrupt" in message and "last-002.ckpt.corrupt" in message
    assert "could not be downloaded" in message and "rerun" in message
