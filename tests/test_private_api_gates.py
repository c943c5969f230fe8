"""Private APIs of pinned packages are used only on the version they were tested with."""
import pytest


@pytest.mark.parametrize("version, raw", [("1.22.1", True), ("1.23.0", False), ("1.22.10", False), ("2.0.0", False)])
def test_raw_mongodb_writes_only_on_the_tested_fiftyone(monkeypatch, version, raw):
    import fiftyone.constants as foc

    from fathompipe.evaluation import fiftyone_io
    for var in ("FIFTYONE_API_URI", "FIFTYONE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(foc, "VERSION", version)
    assert fiftyone_io.raw_writes_allowed() is raw
