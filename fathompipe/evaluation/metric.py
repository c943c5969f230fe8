"""The competition metric: mean hierarchical distance between true and predicted taxa (0 best, 12 worst).

For truth T and prediction P, each a vector of 7 rank slots: per rank +2 when both slots are filled
and differ, +1 when exactly one is filled; when T != P, +1 for each of T and P that is one of the
five exception names. A prediction that is not a known name, or no prediction, scores 12.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from fathompipe.evaluation.taxonomy import load_taxonomy

MAX_DISTANCE = 12


def distance(truth: str, prediction: Optional[str]) -> int:
    taxonomy = load_taxonomy()
    if truth not in taxonomy:
        raise KeyError(f"ground-truth name {truth!r} is not one of the 79 categories")
    if prediction is None or prediction not in taxonomy:
        return MAX_DISTANCE
    t, p = taxonomy[truth], taxonomy[prediction]
    score = 0
    for a, b in zip(t.ranks, p.ranks):
        if a and b:
            score += 2 * (a != b)
        elif a or b:
            score += 1
    if truth != prediction:
        score += t.exception + p.exception
    return score


def distances(truths: Sequence[str], predictions: Iterable[Optional[str]]) -> np.ndarray:
    return np.array([distance(t, p) for t, p in zip(truths, predictions)], dtype=np.int64)

