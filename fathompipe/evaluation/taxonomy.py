"""The 79 FathomNet 2025 categories and their 7-rank taxonomy, exactly as the competition scores them.

Package data: `fathompipe/data/taxonomy.csv` (from the host's scoring notebook; fish use class
Teleostei; five names are metric exceptions).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Dict, List, Tuple

RANKS: Tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


@dataclass(frozen=True)
class Taxon:
    category_id: int
    name: str
    ranks: Tuple[str, ...]  # one slot per RANKS entry, "" where the taxon sits higher
    name_rank: str
    exception: bool

    def at(self, rank: str) -> str:
        return self.ranks[RANKS.index(rank)]


@lru_cache(maxsize=1)
def load_taxonomy() -> Dict[str, Taxon]:
    """Name -> Taxon, in category-id order."""
    text = resources.files("fathompipe").joinpath("data/taxonomy.csv").read_text()
    out: Dict[str, Taxon] = {}
    for row in csv.DictReader(text.splitlines()):
        out[row["name"]] = Taxon(int(row["category_id"]), row["name"], tuple(row[r] for r in RANKS),
                                 row["name_rank"], row["metric_exception"] == "yes")
    return out


def taxonomic_order() -> List[str]:
    """Names sorted along the tree (phylum, class, ... species): neighbours in plots are relatives."""
    return sorted(load_taxonomy(), key=lambda n: tuple(load_taxonomy()[n].ranks))
