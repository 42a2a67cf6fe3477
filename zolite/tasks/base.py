"""What a task is: a template that turns a data row into a prompt, candidate answers and the gold label."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ZoliteError


def bool_label(value) -> int:
    """A yes/no label given as true/false or 1/0."""
    if value not in (True, False, 0, 1):
        raise ValueError(f"label {value!r} is not true/false")
    return int(bool(value))


@dataclass(frozen=True)
class Example:
    prompt: str
    candidates: tuple[str, ...]   # continuations of the prompt, scored by their log-likelihood
    label: int                    # index of the gold candidate (the training target)
    accepted: tuple[int, ...] = ()  # every candidate counted correct (ReCoRD: all gold entities); () = (label,)

    def correct(self) -> tuple[int, ...]:
        return self.accepted or (self.label,)


class Task:
    name: str = ""
    description: str = ""
    fields: tuple[str, ...] = ()         # fields every row must have
    hf_dataset: tuple | None = None      # (path, name) for datasets.load_dataset
    metric: str = "accuracy"
    generative: bool = False             # True: scored by F1/EM of a greedy answer, trained with the LM loss
    max_answer_tokens: int = 50
    per_class: bool = True               # report per-class counts (not for ReCoRD, whose classes are entities)

    def golds(self, row: dict) -> list:
        """The accepted answers of a generation task's row."""
        raise NotImplementedError

    def answer_scores(self, prediction: str, golds: list) -> tuple[float, float]:
        """(exact match, F1) of a generated answer, best over the golds: SQuAD v1.1's official rules."""
        from ..metrics import best_over_golds, exact_match, f1

        return best_over_golds(exact_match, prediction, golds), best_over_golds(f1, prediction, golds)

    def example(self, row: dict) -> Example:
        raise NotImplementedError

    def expand(self, row: dict) -> list[dict]:
        """The examples one line of the file holds (MultiRC: one per answer); most tasks: the line itself."""
        return [row]

    def label(self, row: dict) -> int:
        raise NotImplementedError

    def validate(self, row: dict, path) -> None:
        """Raise a one-line error naming the line when a row cannot be used."""
        where = f"{path}, line {row.get('_line', '?')}"
        missing = [f for f in self.fields if f not in row]
        if missing:
            raise ZoliteError(f"{where}: missing field(s) {', '.join(missing)} needed by task {self.name}")
        try:
            self.example(row)
        except KeyError as e:   # a field the task reads that `fields` does not list (e.g. WSC's spans)
            raise ZoliteError(f"{where}: missing field {e} needed by task {self.name}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise ZoliteError(f"{where}: cannot build a {self.name} example ({type(e).__name__}: {e})") from None
