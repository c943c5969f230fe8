"""The expected-distance decision rule (fathompipe.evaluation.decision) on cases built by hand and at random."""
from __future__ import annotations

import numpy as np
import pytest

from fathompipe.evaluation.decision import decide, distance_matrix
from fathompipe.evaluation.metric import distance
from fathompipe.evaluation.taxonomy import load_taxonomy

NAMES = list(load_taxonomy())  # category-id order, as the model's logits are


def logits_for(probabilities: dict) -> np.ndarray:
    """One row of logits whose softmax is `probabilities` (every other class far below: probability 0)."""
    row = np.full(len(NAMES), -1e4, np.float32)
    for name, p in probabilities.items():
        row[NAMES.index(name)] = np.log(p)
    return row


def test_a_hesitant_rockfish_is_answered_with_its_genus():
    """p: 0.34 Sebastes diploproa, 0.33 Sebastolobus, 0.33 Sebastes. Distances (metric.py): species to its genus 1,
    Sebastes to Sebastolobus 2 (genus differs), the species to Sebastolobus 3. Expected distances:
    E(Sebastes diploproa) = 0.33*3 + 0.33*1 = 1.32 (argmax), E(Sebastes) = 0.34*1 + 0.33*2 = 1.00 (the rule),
    E(Sebastolobus) = 0.34*3 + 0.33*2 = 1.68."""
    species, genus, other = "Sebastes diploproa", "Sebastes", "Sebastolobus"
    assert (distance(species, genus), distance(genus, other), distance(species, other)) == (1, 2, 3)
    p = {species: 0.34, other: 0.33, genus: 0.33}
    truths = [species, other, genus]  # one ROI of each, all with this softmax
    d = decide(np.stack([logits_for(p)] * 3), NAMES)
    assert [NAMES[i] for i in d.argmax] == [species] * 3
    assert [NAMES[i] for i in d.rule] == [genus] * 3 and d.differs.all()
    assert d.expected_argmax == pytest.approx([1.32] * 3, abs=1e-6)
    assert d.expected_rule == pytest.approx([1.00] * 3, abs=1e-6)
    # scored on the truths: argmax 0, 3, 1 (mean 4/3); the rule 1, 2, 0 (mean 1)
    argmax_scores = [distance(t, NAMES[i]) for t, i in zip(truths, d.argmax)]
    rule_scores = [distance(t, NAMES[i]) for t, i in zip(truths, d.rule)]
    assert argmax_scores == [0, 3, 1] and rule_scores == [1, 2, 0]
    # weighted by the model's own probabilities the scores are the expected distances
    weights = [p[t] for t in truths]
    assert np.dot(weights, argmax_scores) == pytest.approx(1.32) and np.dot(weights, rule_scores) == pytest.approx(1.0)


def test_a_confident_answer_is_kept():
    d = decide(logits_for({"Sebastes diploproa": 0.9, "Sebastolobus": 0.05, "Sebastes": 0.05})[None], NAMES)
    assert d.rule[0] == d.argmax[0] == NAMES.index("Sebastes diploproa") and not d.differs.any()
    assert d.expected_rule[0] == d.expected_argmax[0] == pytest.approx(0.05 * 3 + 0.05 * 1)


def test_never_worse_than_argmax_in_expectation_and_the_true_minimum():
    """Random logits from uniform to certain: E(rule) <= E(argmax) on every ROI, and E(rule) is the minimum of
    sum_c p(c) d(c, y) over all 79 names, computed here the slow way from metric.distance."""
    rng = np.random.default_rng(7)
    logits = (rng.normal(0, 1, (3000, 79)) * rng.choice([0.01, 0.5, 2, 8], size=(3000, 1))).astype(np.float32)
    d = decide(logits, NAMES, rows=1000)
    assert (d.expected_rule <= d.expected_argmax + 1e-6).all()
    assert d.differs.any() and (d.expected_rule[d.differs] < d.expected_argmax[d.differs]).all()
    dist = np.array([[distance(c, y) for y in NAMES] for c in NAMES], float)
    for r in rng.choice(3000, 20, replace=False):
        p = np.exp(logits[r].astype(float) - logits[r].max())
        p /= p.sum()
        brute = [sum(p[c] * dist[c, y] for c in range(79)) for y in range(79)]
        assert d.expected_rule[r] == pytest.approx(min(brute), rel=1e-5)
        assert d.expected_argmax[r] == pytest.approx(brute[int(np.argmax(logits[r]))], rel=1e-5)


def test_chunks_of_an_array_a_memory_map_and_an_iterator_agree(tmp_path):
    rng = np.random.default_rng(3)
    logits = (rng.normal(0, 3, (2500, 79))).astype(np.float32)
    whole = decide(logits, NAMES)
    path = tmp_path / "logits.f32"
    logits.tofile(path)
    mapped = np.memmap(path, np.float32, "r", shape=logits.shape)
    for other in (decide(mapped, NAMES, rows=512), decide(iter([logits[:1000], logits[1000:]]), NAMES, rows=300)):
        for field in ("argmax", "rule", "expected_argmax", "expected_rule"):
            assert np.array_equal(getattr(whole, field), getattr(other, field)), field
    assert len(decide(np.empty((0, 79), np.float32), NAMES).rule) == 0
    with pytest.raises(ValueError, match=r"expected \(rows, 79\)"):
        decide(np.zeros((3, 78), np.float32), NAMES)


def test_distance_matrix_is_the_metric():
    d = distance_matrix(NAMES)
    assert d.shape == (79, 79) and (np.diag(d) == 0).all() and d.max() <= 12
    i, j = NAMES.index("Tunicata"), NAMES.index("Pyrosoma atlanticum")
    assert d[i, j] == distance("Tunicata", "Pyrosoma atlanticum")
