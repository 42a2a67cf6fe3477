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
    label: int                    # index of the gold candidate


class Task:
    name: str = ""
    description: str = ""
    fields: tuple[str, ...] = ()         # fields every row must have
    hf_dataset: tuple | None = None      # (path, name) for datasets.load_dataset
    metric: str = "accuracy"
    generative: bool = False             # True: scored by F1/EM of a greedy answer, trained with the LM loss
    max_answer_tokens: int = 50

    def golds(self, row: dict) -> list[str]:
        """The accepted answers of a generation task's row."""
        raise NotImplementedError

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
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise ZoliteError(f"{where}: cannot build a {self.name} example ({type(e).__name__}: {e})") from None
