"""The metric equals the official scoring code on every pair."""
import csv

from conftest import DATA
from fathompipe.evaluation.metric import MAX_DISTANCE, distance, distances
from fathompipe.evaluation.taxonomy import load_taxonomy, taxonomic_order


def test_equals_the_official_matrix_on_all_6241_pairs():
    with open(DATA / "distance_matrix_official.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    predictions = rows[0][1:]
    checked = 0
    for row in rows[1:]:
        truth = row[0]
        for pred, value in zip(predictions, row[1:]):
            assert distance(truth, pred) == int(float(value)), (truth, pred)
            checked += 1
    assert checked == 79 * 79 == 6241


def test_unknown_and_missing_predictions_score_the_maximum():
    assert distance("Sebastolobus", "Nessie") == MAX_DISTANCE == 12
    assert distance("Sebastolobus", None) == 12
    assert list(distances(["Sebastolobus", "Sebastolobus"], ["Sebastolobus", ""])) == [0, 12]


def test_taxonomy_is_the_79_categories():
    tax = load_taxonomy()
    assert len(tax) == 79 and [t.category_id for t in tax.values()] == list(range(1, 80))
    assert sorted(n for n, t in tax.items() if t.exception) == sorted(
        ["Caridea", "Acanthascinae", "Actinopterygii", "Zoantharia", "Tunicata"])
    assert sorted(taxonomic_order()) == sorted(tax)
