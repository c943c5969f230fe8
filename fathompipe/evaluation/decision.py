"""Beyond argmax: the label that minimizes the expected hierarchical distance under the model's softmax.

For one ROI with class probabilities p (the softmax of its logits), answering y scores in expectation
E(y) = sum_c p(c) d(c, y), with d the competition's distance (metric.py). Argmax answers the most probable
class; the expected-distance rule answers argmin_y E(y) over the 79 names, often a broader taxon (a genus
over one of its species, an order over its families) when the model hesitates between relatives. Under the
model's own probabilities the rule can never do worse: E(rule) <= E(argmax) by construction. On real labels
it helps only as far as the softmax is calibrated, which is what the report measures, per class.

Scale (2,000,000 ROIs): logits are taken as a float32 array, a memory map or an iterator of chunks, and
processed CHUNK_ROWS rows at a time (a float64 softmax of the chunk, one (rows x 79) @ (79 x 79) product),
so the working memory is O(CHUNK_ROWS x 79) and never a copy of all logits; the outputs are 16 bytes per ROI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Sequence, Union

import numpy as np

from fathompipe.evaluation.metric import distance

CHUNK_ROWS = 65_536  # 65,536 x 79 float64 = 41 MB per intermediate
TIE = 1e-9  # the rule keeps argmax unless it is better by more than rounding: "differs" then means "better"

Logits = Union[np.ndarray, Iterable[np.ndarray]]


def distance_matrix(names: Sequence[str]) -> np.ndarray:
    """D[c, y] = distance(true c, predicted y), float64, in the order of `names` (the logits' columns)."""
    return np.array([[distance(c, y) for y in names] for c in names], np.float64)


@dataclass
class Decisions:
    """Per ROI, in the order of the logits: column indices into the names, and expected distances."""

    argmax: np.ndarray  # int32
    rule: np.ndarray  # int32: argmin_y E(y), argmax where no label is better by more than TIE
    expected_argmax: np.ndarray  # float32: E(argmax) under the ROI's own softmax
    expected_rule: np.ndarray  # float32: E(rule) <= E(argmax)

    @property
    def differs(self) -> np.ndarray:
        return self.rule != self.argmax


def softmax(chunk: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for any finite logits (the row maximum is subtracted first)."""
    x = np.asarray(chunk, np.float64)
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def chunks(logits: Logits, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Row blocks of at most `rows` rows: slices of an array (a memory map stays on disk), or an iterator's own
    blocks, each cut again when larger."""
    blocks = [logits] if isinstance(logits, np.ndarray) else logits
    for block in blocks:
        for start in range(0, len(block), rows):
            yield block[start:start + rows]


def decide_chunk(chunk: np.ndarray, d: np.ndarray) -> Decisions:
    """The decisions for one block of logits (rows x k) and its k x k distance matrix."""
    if chunk.ndim != 2 or chunk.shape[1] != d.shape[0]:
        raise ValueError(f"logits have shape {chunk.shape}, expected (rows, {d.shape[0]})")
    expected = softmax(chunk) @ d  # (rows, k): E(y) for every candidate y
    rows = np.arange(len(chunk))
    top = np.asarray(chunk).argmax(axis=1)
    best = expected.argmin(axis=1)
    e_top, e_best = expected[rows, top], expected[rows, best]
    rule = np.where(e_best < e_top - TIE, best, top)
    return Decisions(top.astype(np.int32), rule.astype(np.int32), e_top.astype(np.float32),
                     expected[rows, rule].astype(np.float32))


def decide(logits: Logits, names: Sequence[str], rows: int = CHUNK_ROWS) -> Decisions:
    """Argmax and the expected-distance rule for every row of `logits` (columns in the order of `names`)."""
    d = distance_matrix(names)
    parts: List[Decisions] = [decide_chunk(chunk, d) for chunk in chunks(logits, rows)]
    if not parts:
        empty = np.empty(0, np.int32)
        return Decisions(empty, empty, np.empty(0, np.float32), np.empty(0, np.float32))
    return Decisions(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("argmax", "rule", "expected_argmax", "expected_rule")))
