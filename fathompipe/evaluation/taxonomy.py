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


# Unranked clades between two of the seven ranks (World Register of Marine Species), for the ORDER only (the
# metric ignores them): three of the five exception names are such clades, and without them a clade's name sorts
# apart from its members (Tunicata between Actinopterygii and the fishes, Caridea apart from its shrimps).
CLADES: Dict[Tuple[str, str], str] = {
    ("class", "Teleostei"): "Actinopterygii",  # ray-finned fishes
    ("class", "Thaliacea"): "Tunicata",  # Pyrosoma
    ("family", "Pandalidae"): "Caridea",  # Heterocarpus, Pandalus
    ("family", "Lithodidae"): "Anomura",
    ("family", "Munidopsidae"): "Anomura",
    ("family", "Epialtidae"): "Brachyura",  # Chorilia
    ("family", "Oregoniidae"): "Brachyura",  # Chionoecetes
}


def taxonomic_order() -> List[str]:
    """Names sorted along the tree (phylum, class, ... species, with the clades of CLADES between ranks): relatives
    sit together, a taxon right before the taxa inside it, so neighbours in plots are relatives."""
    taxonomy = load_taxonomy()
    clades = set(CLADES.values())

    def key(name: str) -> Tuple[Tuple[str, str], ...]:
        slots = taxonomy[name].ranks
        first_empty = slots.index("") if "" in slots else len(slots)
        return tuple((CLADES.get((rank, slot), "") if slot else
                      (name if name in clades and i == first_empty else ""), slot)
                     for i, (rank, slot) in enumerate(zip(RANKS, slots)))
    return sorted(taxonomy, key=key)
