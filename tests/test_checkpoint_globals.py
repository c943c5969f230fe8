"""What the checkpoint loader says about pickle globals outside its allowlist: exactly what happens, and where
the global sits (README, Troubleshooting)."""
import os

import pytest

from fathompipe.model.slim import CheckpointError
from fathompipe.model.weights import export_slim
from test_checkpoint import ENCODER, Recorder, _with


class Shell:
    """Unpickling this would run a shell command: os.system, from a module torch blocks outright."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["callbacks", "loops"])
def test_blocked_global_refuses_the_whole_file_naming_where_it_sits(tmp_path, where):
    marker = tmp_path / "pwned"
    path = _with(tmp_path, where, [1, Shell(str(marker))])
    with pytest.raises(CheckpointError) as exc:
        export_slim(path, ENCODER)
    msg = str(exc.value)
    assert "refused to load the whole file" in msg and f"{os.system.__module__}.system" in msg
    assert f"at {where}['extra'][1]" in msg and "Nothing from it was executed" in msg
    assert not marker.exists()


def test_inert_stand_ins_are_listed_with_where_they_sit(tmp_path, capsys):
    export_slim(_with(tmp_path, "callbacks", {"tracker": Recorder()}), ENCODER)
    out = capsys.readouterr().out
    assert "loaded as inert stand-ins" in out and "test_checkpoint.Recorder at callbacks['extra']['tracker']" in out
