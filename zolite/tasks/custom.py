"""A user's own task: a JSONL file, a prompt template with {field} slots, and candidates or an answer field.

    zolite tune --task reviews.jsonl --template "Review: {text} Sentiment:" --candidates "negative,positive"
    zolite tune --task my-task.toml        # data, template, candidates | answer_field, label_field

Candidates are split on commas and stripped; each continues the prompt after one space, or directly when the
prompt ends in white space (a new line). The label is a candidate's text or its 0-based index.
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ZoliteError
from ..profile import tomllib
from .base import Example, Task


@dataclass(frozen=True)
class TaskSpec:
    data: str
    template: str
    candidates: tuple[str, ...] = ()
    label_field: str = "label"
    answer_field: str | None = None

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def is_custom(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz", ".toml"))


def spec_from(name: str, template=None, candidates=None, label_field=None, answer_field=None,
              need_data: bool = True) -> TaskSpec:
    """The spec from a TOML file, or from a JSONL path plus the command-line options. need_data=False: the data file
    may be absent (applying a patch needs the template, not the rows it was tuned on)."""
    path = Path(name)
    if name.endswith(".toml") and (need_data or template is None):   # (a patch of a TOML task brings its template)
        if not path.is_file():
            raise ZoliteError(f"task file {name} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ZoliteError(f"{name}: not valid TOML ({e})") from None
        unknown = set(raw) - {"data", "template", "candidates", "label_field", "answer_field"}
        if unknown or "data" not in raw or "template" not in raw:
            raise ZoliteError(f"{name}: needs data and template (and candidates or answer_field); "
                              f"unknown keys: {', '.join(sorted(unknown)) or 'none'}")
        data = raw["data"] if Path(raw["data"]).is_absolute() else str(path.parent / raw["data"])
        cands = raw.get("candidates", [])
        cands = cands.split(",") if isinstance(cands, str) else cands
        return _checked(TaskSpec(data, raw["template"], tuple(c.strip() for c in cands),
                                 raw.get("label_field", "label"), raw.get("answer_field")), name, need_data)
    if template is None:
        raise ZoliteError(f"custom task {name} needs --template \"...{{field}}...\" (or a .toml task file)")
    cands = tuple(c.strip() for c in candidates.split(",")) if candidates else ()
    return _checked(TaskSpec(name, template, cands, label_field or "label", answer_field), name, need_data)


def _checked(spec: TaskSpec, name: str, need_data: bool = True) -> TaskSpec:
    if need_data and not Path(spec.data).is_file():
        raise ZoliteError(f"data file {spec.data} of task {name} does not exist")
    if bool(spec.candidates) == bool(spec.answer_field):
        raise ZoliteError(f"task {name}: give either candidates (classification) or an answer field (generation)")
    if spec.candidates and (len(spec.candidates) < 2 or not all(spec.candidates)):
        raise ZoliteError(f"task {name}: candidates must be at least two non-empty, comma-separated answers")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(spec.template) if f is not None]
    except ValueError as e:
        raise ZoliteError(f"task {name}: bad template ({e}); write fields as {{name}} and braces as {{{{ }}}}") from None
    if not fields:
        raise ZoliteError(f"task {name}: the template has no {{field}} slot")
    odd = [f for f in fields if not f.isidentifier()]   # {} / {0}: positional; {text[0]}, {a.b}: not a field name
    if odd:
        raise ZoliteError(f"task {name}: template slot {{{odd[0]}}} is not a field name; write {{field}} with the "
                          "row's field, e.g. {text}")
    return spec


class CustomTask(Task):
    description = "your JSONL file with a template"

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.name = spec.data
        self.generative = spec.answer_field is not None
        self.metric = "f1" if self.generative else "accuracy"
        self.fields = tuple(f for _, f, _, _ in string.Formatter().parse(spec.template) if f)
        self.fields += (spec.answer_field,) if self.generative else (spec.label_field,)

    def _prompt(self, row):
        return self.spec.template.format(**row)

    def _continuation(self, prompt: str, text: str) -> str:
        return text if prompt[-1:].isspace() or not prompt else " " + text

    def label(self, row):
        value = row[self.spec.label_field]
        cands = self.spec.candidates
        if isinstance(value, str) and value.strip() in cands:
            return cands.index(value.strip())
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(cands):
            return value
        raise ValueError(f"label {value!r} is not one of the candidates {', '.join(cands)} nor their index")

    def golds(self, row):
        answers = row[self.spec.answer_field]
        answers = [answers] if isinstance(answers, str) else answers
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{self.spec.answer_field} must be a string or a list of strings")
        return list(answers)

    def example(self, row):
        prompt = self._prompt(row)
        if self.generative:
            return Example(prompt, (self._continuation(prompt, self.golds(row)[0]),), 0)
        return Example(prompt, tuple(self._continuation(prompt, c) for c in self.spec.candidates), self.label(row))
