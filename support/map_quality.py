"""How well a 2-D map keeps each label's neighbourhoods: the measure the embeddings map is held to (issue 18), shared by
the tests and bench/scale.py."""
from __future__ import annotations

import numpy as np


def neighbour_agreement(points: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """The fraction of each point's k nearest neighbours in the map (itself excluded) that share its label, averaged
    over the points."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points, return_distance=False)[:, 1:]
    return float((labels[index] == labels[:, None]).mean())
