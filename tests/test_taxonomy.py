"""The taxonomic order of the report's matrix and tables, on the real 79-name taxonomy in fathompipe/data/."""
from __future__ import annotations

from fathompipe.evaluation.taxonomy import CLADES, RANKS, load_taxonomy, taxonomic_order


def test_every_name_once():
    assert sorted(taxonomic_order()) == sorted(load_taxonomy())


def test_chordates_and_decapods_sit_with_their_relatives():
    order = taxonomic_order()
    chordata = [n for n in order if load_taxonomy()[n].at("phylum") == "Chordata"]
    assert chordata == ["Actinopterygii", "Merluccius productus", "Sebastes", "Sebastes diploproa", "Sebastolobus",
                        "Microstomus pacificus", "Tunicata", "Pyrosoma atlanticum"]
    decapoda = [n for n in order if load_taxonomy()[n].at("order") == "Decapoda"]
    assert decapoda == ["Lithodidae", "Paralomis multispina", "Munidopsis",  # Anomura
                        "Chorilia longipes", "Chionoecetes tanneri",  # Brachyura
                        "Caridea", "Heterocarpus", "Pandalus amplus", "Pandalus platyceros"]


def test_every_taxon_and_clade_is_one_contiguous_block_headed_by_its_own_name():
    """Members of one taxon at any rank (and of one clade) are neighbours, and a name that IS that taxon or clade
    (Actinopterygii, Tunicata, Caridea, Porifera, ...) comes first in its block."""
    taxonomy, order = load_taxonomy(), taxonomic_order()
    groups = {}
    for i, name in enumerate(order):
        slots = taxonomy[name].ranks
        for rank, slot in zip(RANKS, slots):
            if slot:
                groups.setdefault((rank, slot), []).append(i)
                if (rank, slot) in CLADES:
                    groups.setdefault(("clade", CLADES[rank, slot]), []).append(i)
        if name in set(CLADES.values()):
            groups.setdefault(("clade", name), []).append(i)
    for group, at in groups.items():
        assert at == list(range(at[0], at[0] + len(at))), group
    for name in ("Actinopterygii", "Tunicata", "Caridea", "Porifera", "Hexactinellida", "Holothuroidea"):
        rank = taxonomy[name].name_rank
        block = groups[("clade", name)] if name in set(CLADES.values()) else groups[(rank, name)]
        assert order[block[0]] == name
