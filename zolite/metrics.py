"""Answer metrics for generation tasks, as the official SQuAD v1.1 and DROP evaluation scripts compute them."""
from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles (a, an, the), collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: list[str]) -> float:
    """SQuAD scores a prediction against every gold answer and keeps the best."""
    return max(metric(prediction, g) for g in golds)


# --- DROP (Dua et al. 2019): the official drop_eval.py rules, numbers and multi-span answers included ---

def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _drop_normalize(text: str) -> str:
    """Per token (split on spaces and hyphens): lower, drop punctuation unless a number, numbers as floats,
    drop articles."""
    parts = []
    for token in re.split(" |-", text):
        token = token.lower()
        if not _is_number(token):
            token = "".join(ch for ch in token if ch not in _PUNCT)
        if _is_number(token):
            token = str(float(token))
        token = " ".join(_ARTICLES.sub(" ", token).split())
        if token.strip():
            parts.append(token)
    return " ".join(parts).strip()


def _bags(spans) -> tuple[list[str], list[set]]:
    spans = [spans] if isinstance(spans, str) else list(spans)
    normalized = [_drop_normalize(s) for s in spans]
    return normalized, [set(n.split()) for n in normalized]


def _bag_f1(predicted: set, gold: set) -> float:
    same = len(gold & predicted)
    precision = same / len(predicted) if predicted else 1.0
    recall = same / len(gold) if gold else 1.0
    return 0.0 if precision == recall == 0.0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set, predicted: set) -> bool:
    """A gold bag with numbers only matches a predicted bag sharing one of them."""
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def _aligned_f1(predicted: list[set], gold: list[set]) -> float:
    """Mean F1 over the best one-to-one alignment of gold and predicted bags (drop_eval's linear_sum_assignment;
    answers have a handful of spans, so trying every assignment is exact and cheap)."""
    from itertools import permutations

    scores = [[_bag_f1(p, g) if _numbers_agree(g, p) else 0.0 for p in predicted] for g in gold]
    small, large = (len(gold), len(predicted))
    best = 0.0
    if small <= large:
        for cols in permutations(range(large), small):
            best = max(best, sum(scores[r][c] for r, c in enumerate(cols)))
    else:
        for rows in permutations(range(small), large):
            best = max(best, sum(scores[r][c] for c, r in enumerate(rows)))
    return best / max(small, large)


def drop_scores(prediction, gold) -> tuple[float, float]:
    """(EM, F1) of a prediction (a string or a list of spans) against one gold answer (a list of spans)."""
    pred_spans, pred_bags = _bags(prediction)
    gold_spans, gold_bags = _bags(gold)
    em = float(set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans))
    return em, round(_aligned_f1(pred_bags, gold_bags), 2)


def drop_answer_spans(answer: dict) -> list[str]:
    """An answer of DROP's JSON ({number, spans, date}) as the list of strings it stands for (drop_eval's
    answer_json_to_strings); [] for an empty answer."""
    if answer.get("number"):
        return [str(answer["number"])]
    if answer.get("spans"):
        return list(answer["spans"])
    date = answer.get("date") or {}
    text = " ".join(str(date.get(k, "")) for k in ("day", "month", "year")).strip()
    return [" ".join(text.split())] if text else []
