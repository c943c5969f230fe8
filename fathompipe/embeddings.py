"""The per-ROI embeddings file: written by the infer stage, read by the evaluate stage without loading it whole.

OUT.embeddings.npy: (N, D) float32, row i the vector the classifier head saw for the ROI in row i of
OUT.parquet (ascending annotation id). At MBARI's size that is 2M x 1024 floats, 8.2 GB: it is written
and read row by row with positional writes and reads (`RowFile`, `Rows`), so neither side holds it in memory,
not even as mapped pages (which a job's memory accounting would count). float32, not
float16: the head applied to a stored row gives the saved logits back to 1e-5, and float16 would halve
only the disk. Runs of an earlier version wrote OUT.embeddings.npz (`annotation_id` and `embeddings`),
still read here. Free of torch, so the evaluate job reads it without loading the model's stack.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import numpy as np


CACHE_BYTES = 256 * 2**20


def drop_cache(fd: int) -> None:
    """Ask the kernel to write back the file's dirty pages and drop its clean ones (streamed data read or written
    once), so a merge of 17 GB does not fill the page cache."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


class RowFile:
    """An .npy array of shape (rows, cols) filled row by row at any position with `pwrite`: nothing is mapped into
    the writer's memory, however large the file. Every CACHE_BYTES written, the kernel is told to write the file's
    dirty pages back and drop those already written (`POSIX_FADV_DONTNEED`, which does not wait): 8 GB written
    leave a bounded page cache, instead of filling it and paying for its reclaim on this process's time."""

    def __init__(self, path: Path, rows: int, cols: int, dtype: np.dtype | type = np.float32):
        self.dtype = np.dtype(dtype)
        self.cols = cols
        self.fh = open(path, "r+b" if path.exists() else "w+b")
        np.lib.format.write_array_header_1_0(self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": (rows, cols)})
        self.offset = self.fh.tell()
        self.row_bytes = cols * self.dtype.itemsize
        self.uncached = 0  # bytes written since the page cache was last trimmed
        os.ftruncate(self.fh.fileno(), self.offset + rows * self.row_bytes)

    def write(self, positions: np.ndarray, rows: np.ndarray) -> None:
        """rows[k] goes to row positions[k]; consecutive positions are written in one call."""
        order = np.argsort(positions, kind="stable")
        positions, rows = positions[order], np.ascontiguousarray(rows[order], dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        for run in np.split(np.arange(len(positions)), breaks):
            if len(run):
                data = memoryview(rows[run[0]:run[-1] + 1]).cast("B")
                at = self.offset + int(positions[run[0]]) * self.row_bytes
                while data:  # one pwrite writes at most about 2 GiB, and less on some file systems
                    written = os.pwrite(self.fh.fileno(), data, at)
                    data, at = data[written:], at + written
                    self.uncached += written
        if self.uncached >= CACHE_BYTES:
            drop_cache(self.fh.fileno())
            self.uncached = 0

    def close(self) -> None:
        self.fh.close()


class Rows:
    """An (N, D) .npy array read on demand with `pread`: `rows[idx]` reads only those rows (consecutive ones in one
    call), `np.asarray(rows)` all of them."""

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            self.shape, fortran, self.dtype = read_header(fh)
            self.offset = fh.tell()
        if len(self.shape) != 2 or fortran:
            raise ValueError(f"{path}: expected a (rows, columns) array in C order, got shape {self.shape}")
        self.path = path
        self.ndim = 2
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: "slice | np.ndarray") -> np.ndarray:
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        with open(self.path, "rb") as fh:
            at = 0
            for run in np.split(rows, breaks):
                if len(run):
                    self._read_into(fh.fileno(), out[at:at + len(run)], int(run[0]))
                    at += len(run)
        return out

    def _read_into(self, fd: int, out: np.ndarray, first_row: int) -> None:
        """out's rows from the file's row first_row on, read straight into out (one preadv reads at most about
        2 GiB: loop); a file that ends early is one error naming it."""
        into, at = memoryview(out).cast("B"), self.offset + first_row * self.row_bytes
        while into:
            got = os.preadv(fd, [into], at)
            if got == 0:
                raise ValueError(f"{self.path}: ends at byte {at}, before row {first_row + len(out) - 1} of the "
                                 f"{self.shape} array its header declares (a truncated copy?)")
            into, at = into[got:], at + got

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        whole = self[slice(None)]
        return whole if dtype is None else whole.astype(dtype)


def load_embeddings(path: str | Path) -> Tuple[np.ndarray, "np.ndarray | Rows"]:
    """(annotation_id (N,) int64 ascending, embeddings (N, D) float32). From an OUT.embeddings.npy the embeddings are
    `Rows`, read when indexed (the ids then come from OUT.parquet beside it); from an earlier version's .npz, an
    array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embeddings {path} do not exist (the infer stage writes them beside its predictions)")
    if path.suffix == ".npz":
        with np.load(path) as z:
            if not {"annotation_id", "embeddings"} <= set(z.files):
                raise ValueError(f"{path}: expected arrays annotation_id and embeddings, found {sorted(z.files)}")
            ids, emb = z["annotation_id"], z["embeddings"]
    else:
        import pyarrow.parquet as pq
        parquet = path.with_name(path.name.removesuffix(".embeddings.npy") + ".parquet")
        ids = pq.read_table(parquet, columns=["annotation_id"])["annotation_id"].to_numpy()
        emb = Rows(path)
    if emb.ndim != 2 or len(ids) != len(emb):
        raise ValueError(f"{path}: embeddings of shape {emb.shape} do not match {len(ids)} annotation ids")
    return ids, emb
