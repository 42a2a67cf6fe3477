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


# DROP: official drop_eval.py rules (numbers as floats, punctuation kept in numbers, multi-span alignment)
@pytest.mark.parametrize("prediction, gold, em, f1_", [
    ("570", ["570"], 1.0, 1.0),
    ("570.0", ["570"], 1.0, 1.0),                       # numbers compare as floats
    ("the 570 people", ["570"], 0.0, 0.67),             # {570.0, people} vs {570.0}: P 1/2, R 1 -> 0.67
    ("571", ["570"], 0.0, 0.0),
    ("3 March 1856", ["3 March 1856"], 1.0, 1.0),
    ("fishermen", ["fishermen from Kestrel Point"], 0.0, 0.4),   # P 1, R 1/4 -> 0.4
    ("Tobi Ash", ["Mara Venn", "Tobi Ash", "Lio Park"], 0.0, 0.33),   # one of three gold bags matched
    ("well-known", ["well known"], 1.0, 1.0),          # hyphens split tokens
    ("14 km", ["16 km"], 0.0, 0.0),                     # a gold number must appear in the prediction
])
def test_drop_scores_by_hand(prediction, gold, em, f1_):
    from zolite.metrics import drop_scores

    assert drop_scores(prediction, gold) == (em, pytest.approx(f1_))


def test_drop_multi_span_prediction_is_aligned_one_to_one():
    from zolite.metrics import drop_scores

    assert drop_scores(["Tobi Ash", "Mara Venn"], ["Mara Venn", "Tobi Ash"]) == (1.0, 1.0)
    # each gold bag takes at most one predicted bag: two golds, one prediction -> mean(1, 0)
    assert drop_scores(["Ann"], ["Ann", "Bob"]) == (0.0, 0.5)


def test_drop_answer_json():
    from zolite.metrics import drop_answer_spans

    assert drop_answer_spans({"number": "7", "spans": [], "date": {"day": "", "month": "", "year": ""}}) == ["7"]
    assert drop_answer_spans({"number": "", "spans": ["a", "b"], "date": {}}) == ["a", "b"]
    assert drop_answer_spans({"number": "", "spans": [], "date": {"day": "", "month": "May", "year": "1990"}}) == ["May 1990"]
    assert drop_answer_spans({"number": "", "spans": [], "date": {"day": "", "month": "", "year": ""}}) == []
