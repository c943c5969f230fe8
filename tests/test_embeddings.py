"""The embeddings file's positional writer and reader (fathompipe/embeddings.py): rows land where they belong,
partial reads and writes (one call moves at most about 2 GiB on Linux) are completed, a truncated file is named."""
from __future__ import annotations

import os

import numpy as np
import pytest

from fathompipe import embeddings
from fathompipe.embeddings import RowFile, Rows


def _written(path, positions, rows, n):
    f = RowFile(path, n, rows.shape[1])
    f.write(positions, rows)
    f.close()


def test_rows_written_anywhere_read_back_by_slice_and_index(tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings, "CACHE_BYTES", 64)  # the page cache trimmed after every write: the same file
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    positions = rng.permutation(50)
    _written(tmp_path / "e.npy", positions[:30], vectors[positions[:30]], 50)
    f = RowFile(tmp_path / "e.npy", 50, 8)  # reopened, as a resumed merge would: the rest written later
    f.write(positions[30:], vectors[positions[30:]])
    f.close()
    assert np.array_equal(np.load(tmp_path / "e.npy"), vectors)
    rows = Rows(tmp_path / "e.npy")
    assert np.array_equal(rows[5:17], vectors[5:17])
    assert np.array_equal(rows[np.array([3, 4, 5, 40, 2])], vectors[[3, 4, 5, 40, 2]])
    assert np.array_equal(np.asarray(rows), vectors)


def test_partial_reads_and_writes_are_completed(tmp_path, monkeypatch):
    """Each call moves at most 100 bytes here (a run of rows is 32 bytes a row): the loops finish the job."""
    pwrite, preadv = os.pwrite, os.preadv
    calls = {"w": 0, "r": 0}

    def short_pwrite(fd, data, offset):
        calls["w"] += 1
        return pwrite(fd, bytes(data[:100]), offset)

    def short_preadv(fd, buffers, offset):
        calls["r"] += 1
        (into,) = buffers
        return preadv(fd, [into[:100]], offset)

    monkeypatch.setattr(embeddings.os, "pwrite", short_pwrite)
    monkeypatch.setattr(embeddings.os, "preadv", short_preadv)
    vectors = np.arange(40 * 8, dtype=np.float32).reshape(40, 8)
    _written(tmp_path / "e.npy", np.arange(40), vectors, 40)
    assert np.array_equal(Rows(tmp_path / "e.npy")[:], vectors)
    assert calls["w"] >= 40 * 32 // 100 and calls["r"] >= 40 * 32 // 100


def test_a_truncated_file_is_one_error_naming_it(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, np.ones((10, 4), np.float32))
    os.truncate(path, os.path.getsize(path) - 20)
    with pytest.raises(ValueError, match=r"e\.npy: ends at byte .* before row 9 of the \(10, 4\) array"):
        Rows(path)[:]
