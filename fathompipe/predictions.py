"""The inference stage's outputs, merged from its part files in bounded memory.

Once every shard is done, the part files (one per batch) become, each written once and atomically:
OUT.skipped.csv, OUT.embeddings.npy, OUT.parquet (annotation id ascending: image id, split, name,
confidence, top-5, the 79 logits, the label where known, a note) and, last (the stage's completion test),
OUT.csv in the competition's format. A deployment has 2,000,000 ROIs (their embeddings alone are 8.2 GB),
so the embeddings are never held in memory:
  1. the annotation ids of every part give the output order;
  2. every part is read once: its embeddings go to OUT.embeddings.npy at their rows with positional writes
     (nothing mapped), its logits, image ids and notes to arrays in memory at their rows;
  3. CHUNK ROIs at a time, softmax, top-5 and labels become one parquet row group and the CSV's lines.
Peak memory: about 360 bytes a ROI (the 79 logits, ids, image ids, notes: 0.7 GB at 2M) plus one chunk; the
embeddings, 4 KB a ROI, never. Outputs newer than every shard's marker are not merged again. Free of torch.
"""
from __future__ import annotations

import fcntl
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fathompipe import atomic
from fathompipe.annotations import Coco
from fathompipe.embeddings import RowFile, drop_cache
from fathompipe.layout import OutputFiles

TOPK = 5
CHUNK = 65_536  # ROIs per parquet row group, softmax and CSV write


def merge(coco: Coco, out: OutputFiles, class_names: Sequence[str], num_shards: int, split: str,
          embeddings: bool = True) -> Optional[Dict[str, int]]:
    """Merge the parts once every shard is done (None before that). With `embeddings` off, embeddings found in parts
    are ignored and no OUT.embeddings.npy is left; with it on, the file is written only when every part has them.
    Returns how many ROIs were predicted, skipped and embedded."""
    out.parts.mkdir(parents=True, exist_ok=True)
    with open(out.merge_lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(out.shard_marker(s, num_shards).exists() for s in range(num_shards)):
            return None
        done = _merged_already(out, num_shards, embeddings)
        if done is not None:
            return done
        parts = out.all_parts()
        ids, counts, width = _part_ids(parts)
        order = np.argsort(ids, kind="stable")
        ann_id = ids[order]
        if (np.diff(ann_id) == 0).any():
            raise RuntimeError(f"{out.parts}: duplicate annotation ids across parts (mixed runs?); delete it and rerun")
        position = np.empty(len(ids), np.int64)
        position[order] = np.arange(len(ids))  # row in part order -> row in the outputs
        width = width if embeddings else None
        with ExitStack() as stack:
            csv = stack.enter_context(atomic.atomic_path(out.csv))  # renamed last: entered first
            parquet = stack.enter_context(atomic.atomic_path(out.parquet))
            emb = None
            if width:
                emb = RowFile(stack.enter_context(atomic.atomic_path(out.embeddings)), len(ids), width)
                stack.callback(emb.close)
            logits, image_ids, notes, skipped = _scatter(parts, counts, position, len(class_names), emb)
            skipped.sort()
            atomic.write_text(out.skipped, "annotation_id,image_id,reason\n" +
                              "".join(f"{a},{i},{_csv_field(r)}\n" for a, i, r in skipped))
            _write_tables(parquet, csv, coco, ann_id, image_ids, notes, logits, class_names, split)
        for stale in ([] if width else [out.embeddings]) + [out.legacy_embeddings]:  # once the new outputs exist
            stale.unlink(missing_ok=True)
        return {"predicted": len(ids), "skipped": len(skipped), "embedded": len(ids) if width else 0}


def _merged_already(out: OutputFiles, num_shards: int, embeddings: bool) -> Optional[Dict[str, int]]:
    """The counts of outputs merged after the last shard finished (a rerun of a finished stage, or a second shard
    that finished while the first merged), or None when a merge is due."""
    try:
        merged_at = out.csv.stat().st_mtime_ns
        last_shard = max(out.shard_marker(s, num_shards).stat().st_mtime_ns for s in range(num_shards))
        predicted = pq.read_metadata(out.parquet).num_rows
        with open(out.skipped) as fh:
            skipped = sum(1 for _ in fh) - 1
    except FileNotFoundError:
        return None
    if merged_at < last_shard or out.embeddings.exists() != embeddings:
        return None
    return {"predicted": predicted, "skipped": skipped, "embedded": predicted if embeddings else 0}


def _part_ids(parts: List[Path]) -> Tuple[np.ndarray, List[int], Optional[int]]:
    """Every part's annotation ids concatenated in part order, each part's row count, and the embeddings' width when
    every part with a ROI has them (else None: parts of an earlier version)."""
    chunks, width, complete = [], None, True
    for part in parts:
        with np.load(part) as z:
            chunks.append(z["annotation_id"])
            if len(chunks[-1]) and "embeddings" not in z.files:
                complete = False
            elif len(chunks[-1]) and width is None:
                width = z["embeddings"].shape[1]
    ids = np.concatenate(chunks) if chunks else np.empty(0, np.int64)
    return ids, [len(c) for c in chunks], width if complete else None


def _scatter(parts: List[Path], counts: List[int], position: np.ndarray, classes: int, emb: Optional[RowFile]
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[Tuple[int, int, str]]]:
    """Read every part once: embeddings to their rows of the file; logits, image ids and notes at their output rows
    returned, with the skipped ROIs."""
    n = len(position)
    logits, image_ids, notes = np.empty((n, classes), np.float32), np.empty(n, np.int64), np.empty(n, object)
    skipped: List[Tuple[int, int, str]] = []
    at = 0
    for part, count in zip(parts, counts):
        rows = position[at:at + count]
        with open(part, "rb") as fh, np.load(fh) as z:
            if count:
                logits[rows] = z["logits"]
                if emb is not None:
                    emb.write(rows, z["embeddings"])
                image_ids[rows] = z["image_id"]
                notes[rows] = z["note"].tolist()
            skipped += [tuple(json.loads(s)) for s in z["skipped"].tolist()]
            drop_cache(fh.fileno())  # read once: its pages need not stay cached
        at += count
    return logits, image_ids, notes, skipped


def _write_tables(parquet: Path, csv: Path, coco: Coco, ann_id: np.ndarray, image_ids: np.ndarray,
                  notes: np.ndarray, all_logits: np.ndarray, class_names: Sequence[str], split: str) -> None:
    """OUT.parquet (one row group per chunk) and OUT.csv, from the logits in output order."""
    names = pa.array(list(class_names), pa.string())
    row_of = _rows_in(coco, ann_id)
    k = min(TOPK, len(class_names))
    with pq.ParquetWriter(parquet, SCHEMA) as writer, open(csv, "w") as fh:
        fh.write("annotation_id,concept_name\n")
        for start in range(0, len(ann_id), CHUNK):
            stop = min(start + CHUNK, len(ann_id))
            logits = all_logits[start:stop]
            probs = softmax(logits)
            top = top_k(probs, k)
            top_p = np.take_along_axis(probs, top, axis=1)
            ids, rows = ann_id[start:stop], row_of[start:stop]
            labels = coco.labels(np.maximum(rows, 0))
            labels[rows < 0] = None
            predicted = names.take(pa.array(top[:, 0]))
            writer.write_table(pa.table({
                "annotation_id": pa.array(ids, pa.int64()),
                "image_id": pa.array(image_ids[start:stop], pa.int64()),
                "split": pa.array([split] * len(ids), pa.string()),
                "concept_name": predicted,
                "confidence": pa.array(top_p[:, 0], pa.float32()),
                "top5_names": _lists(names.take(pa.array(top.ravel())), k),
                "top5_scores": _lists(pa.array(top_p.ravel(), pa.float32()), k),
                "logits": _lists(pa.array(logits.ravel(), pa.float32()), logits.shape[1]),
                "label": pa.array(labels.tolist(), pa.string()),
                "note": pa.array(notes[start:stop].tolist(), pa.string()),
            }, schema=SCHEMA))
            fh.write("".join(f"{a},{_csv_field(p)}\n" for a, p in zip(ids.tolist(), predicted.to_pylist())))


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the k largest values, largest first (ties: lower column first)."""
    candidates = np.argpartition(-probs, k - 1, axis=1)[:, :k] if k < probs.shape[1] else \
        np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
    values = np.take_along_axis(probs, candidates, axis=1)
    order = np.lexsort((candidates, -values), axis=1)
    return np.take_along_axis(candidates, order, axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for any logits."""
    x = logits - logits.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def _rows_in(coco: Coco, ann_id: np.ndarray) -> np.ndarray:
    """The row in `coco.annotations` of each annotation id; -1 for an id the file does not have."""
    order = np.argsort(coco.annotations.id, kind="stable")
    known = coco.annotations.id[order]
    if not len(known):
        return np.full(len(ann_id), -1, np.int64)
    at = np.searchsorted(known, ann_id).clip(0, len(known) - 1)
    return np.where(known[at] == ann_id, order[at], -1)


def _lists(values: pa.Array, width: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32)), values)


def _csv_field(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value


SCHEMA = pa.schema([("annotation_id", pa.int64()), ("image_id", pa.int64()), ("split", pa.string()),
                    ("concept_name", pa.string()), ("confidence", pa.float32()),
                    ("top5_names", pa.list_(pa.string())), ("top5_scores", pa.list_(pa.float32())),
                    ("logits", pa.list_(pa.float32())), ("label", pa.string()), ("note", pa.string())])


# --- reading: what the evaluate stage keeps per ROI -------------------------------------------------------------

NOT_IN_FILE = "no prediction in the predictions file"


@dataclass
class Predictions:
    """A split's predictions as compact columns, row i for annotation_id[i] (ascending): about 40 bytes a ROI (80 MB at
    2M ROIs), the names shared, never one object per ROI. The logits (79 floats a ROI) stay in the parquet, read in
    chunks by `logit_chunks`. From the infer stage's OUT.parquet (any version), or a competition CSV (names only)."""

    path: Path
    annotation_id: np.ndarray  # int64, ascending
    concept_name: np.ndarray  # object: the predicted name (shared str objects)
    confidence: np.ndarray  # float32; NaN where the file has none (a CSV)
    top5: Optional[np.ndarray]  # (N, 5) int16 into `vocabulary`; None without top-5
    top5_scores: Optional[np.ndarray]  # (N, 5) float32
    vocabulary: List[str]
    skipped: Dict[int, str]  # ROIs the infer stage skipped: annotation id -> why (OUT.skipped.csv)
    file_row: np.ndarray  # the row in the file of each row here (the file may not be sorted)
    n_logits: int  # logits per ROI in the file (0: none)

    def __len__(self) -> int:
        return len(self.annotation_id)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The row of each annotation id; -1 where there is no prediction for it."""
        ids = np.asarray(ids, np.int64)
        if not len(self):
            return np.full(len(ids), -1, np.int64)
        at = np.searchsorted(self.annotation_id, ids).clip(0, len(self) - 1)
        return np.where(self.annotation_id[at] == ids, at, -1)

    def logit_chunks(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """(rows here, logits (k, n_logits) float32) for every prediction, CHUNK at a time, in the file's order."""
        if not self.n_logits:
            raise ValueError(f"{self.path}: has no logits")
        here = np.empty(len(self), np.int64)
        here[self.file_row] = np.arange(len(self))
        at = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=CHUNK, columns=["logits"]):
            column, k = batch.column(0), batch.num_rows
            if column.null_count or (pc.list_value_length(column).to_numpy() != self.n_logits).any():
                raise ValueError(f"{self.path}: rows {at}..{at + k - 1} do not all have {self.n_logits} logits")
            values = column.flatten().to_numpy().astype(np.float32, copy=False)
            yield here[at:at + k], values.reshape(k, self.n_logits)
            at += k


def read_predictions(path: str | Path) -> Predictions:
    """The predictions in `path` (OUT.parquet or a competition CSV), validated: one row per annotation id; the ROIs
    the infer stage skipped from the OUT.skipped.csv beside it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"predictions {path} do not exist (run the infer stage first)")
    if path.suffix == ".parquet":
        file = pq.ParquetFile(path)
        columns = set(file.schema_arrow.names)
        if not {"annotation_id", "concept_name"} <= columns:
            raise ValueError(f"{path}: expected columns annotation_id and concept_name, got {sorted(columns)}")
        wanted = [c for c in ("annotation_id", "concept_name", "confidence", "top5_names", "top5_scores")
                  if c in columns]
        codes: Dict[str, int] = {}  # name -> code, for the names and the top-5 names alike
        parts: Dict[str, list] = {c: [] for c in wanted}
        for batch in file.iter_batches(batch_size=CHUNK, columns=wanted):
            k = batch.num_rows
            parts["annotation_id"].append(batch["annotation_id"].to_numpy())
            parts["concept_name"].append(_codes(batch["concept_name"], codes))
            if "confidence" in parts:
                parts["confidence"].append(batch["confidence"].to_numpy(zero_copy_only=False).astype(np.float32))
            if "top5_names" in parts and "top5_scores" in parts and k:
                parts["top5_names"].append(_codes(batch["top5_names"].flatten(), codes).reshape(k, -1))
                parts["top5_scores"].append(batch["top5_scores"].flatten().to_numpy().astype(np.float32)
                                            .reshape(k, -1))
        vocabulary = sorted(codes, key=codes.get)
        ids = _join(parts["annotation_id"], np.int64)
        names = np.asarray(vocabulary + [None], dtype=object)[_join(parts["concept_name"], np.int16)]
        confidence = _join(parts["confidence"], np.float32) if "confidence" in parts else \
            np.full(len(ids), np.nan, np.float32)
        top5 = scores = None
        if parts.get("top5_names") and parts.get("top5_scores"):
            top5, scores = np.concatenate(parts["top5_names"]), np.concatenate(parts["top5_scores"])
        n_logits = _logits_width(file) if "logits" in columns else 0
    else:
        import pandas as pd
        frame = pd.read_csv(path, dtype={"annotation_id": "int64", "concept_name": "category"}, keep_default_na=False)
        if list(frame.columns[:2]) != ["annotation_id", "concept_name"]:
            raise ValueError(f"{path}: expected columns annotation_id,concept_name, got {list(frame.columns)}")
        ids = frame["annotation_id"].to_numpy()
        categories = np.asarray(frame["concept_name"].cat.categories.astype(str).tolist() + [None], dtype=object)
        names = categories[frame["concept_name"].cat.codes.to_numpy()]
        confidence = np.full(len(ids), np.nan, np.float32)
        top5 = scores = None
        vocabulary, n_logits = [], 0
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    duplicated = np.flatnonzero(np.diff(ids) == 0)
    if len(duplicated):
        raise ValueError(f"{path}: annotation_id {int(ids[duplicated[0]])} appears more than once")
    return Predictions(path, ids, names[order], confidence[order], None if top5 is None else top5[order],
                       None if scores is None else scores[order], vocabulary,
                       read_skipped(OutputFiles(path.with_suffix(".csv")).skipped), order, n_logits)


def read_skipped(path: Path) -> Dict[int, str]:
    """annotation_id -> reason from an OUT.skipped.csv; empty when there is none."""
    if not path.exists():
        return {}
    import pandas as pd
    table = pd.read_csv(path, dtype={"annotation_id": "int64", "reason": "string"}, keep_default_na=False)
    if list(table.columns) != ["annotation_id", "image_id", "reason"]:
        raise ValueError(f"{path}: expected columns annotation_id,image_id,reason, got {list(table.columns)}")
    return dict(zip(table["annotation_id"].tolist(), table["reason"].tolist()))


def _codes(column: pa.Array, codes: Dict[str, int]) -> np.ndarray:
    """Each string's code in `codes` (new strings added), -1 for a null: int16, one small integer a value."""
    encoded = column.dictionary_encode()
    local = np.asarray([codes.setdefault(name, len(codes)) for name in encoded.dictionary.to_pylist()] + [-1],
                       np.int16)
    return local[encoded.indices.fill_null(len(local) - 1).to_numpy()]


def _join(parts: list, dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)


def _logits_width(file: pq.ParquetFile) -> int:
    """The number of logits a row has (the first row's; `logit_chunks` checks every row against it)."""
    for batch in file.iter_batches(batch_size=1, columns=["logits"]):
        column = batch.column(0)
        return 0 if column.null_count else int(pc.list_value_length(column).to_numpy()[0])
    return 0
