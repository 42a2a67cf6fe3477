"""EM / F1 agree with hand-computed values and the official SQuAD normalisation."""
import pytest

from zolite.metrics import best_over_golds, exact_match, f1, normalize_answer


@pytest.mark.parametrize("raw, normal", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an apple,  a pear and THE plum ", "apple pear and plum"),
    ("Theatre", "theatre"),                 # 'the' only as a whole word
    ("1,000 km.", "1000 km"),
    ("", ""),
])
def test_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos", "Denver Broncos!") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    # pred {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert f1("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count once per occurrence: pred {a:2 -> 'x x'}, gold 'x' -> P 1/2, R 1 -> 2/3
    assert f1("x x", "x") == pytest.approx(2 / 3)
    assert f1("nothing here", "Denver") == 0.0
    assert f1("", "Denver") == 0.0


def test_best_over_several_golds():
    golds = ["Santa Clara, California", "Levi's Stadium", "Levi's Stadium in the San Francisco Bay Area"]
    assert best_over_golds(exact_match, "Levi's Stadium", golds) == 1.0
    assert best_over_golds(f1, "Santa Clara", golds) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
