"""SST-2 and BoolQ with MeZO's prompt templates (princeton-nlp/MeZO, large_models/templates.py)."""
from __future__ import annotations

from .base import Example, Task, bool_label


class SST2(Task):
    name = "sst2"
    description = "SST-2 sentiment (GLUE): '<sentence> It was' -> ' terrible' | ' great'"
    fields = ("sentence", "label")
    hf_dataset = ("glue", "sst2")
    candidates = (" terrible", " great")

    def label(self, row):
        label = int(row["label"])
        if label not in (0, 1):
            raise ValueError(f"label {row['label']!r} is not 0 or 1")
        return label

    def example(self, row):
        return Example(f"{row['sentence'].strip()} It was", self.candidates, self.label(row))


class BoolQ(Task):
    name = "boolq"
    description = "BoolQ yes/no questions (SuperGLUE): '<passage> <Question?>\\n' -> 'No' | 'Yes'"
    fields = ("passage", "question", "label")
    hf_dataset = ("super_glue", "boolq")
    candidates = ("No", "Yes")

    def label(self, row):
        return bool_label(row["label"])

    def example(self, row):
        question = row["question"].strip()
        if not question.endswith("?"):
            question += "?"
        question = question[0].upper() + question[1:]
        return Example(f"{row['passage']} {question}\n", self.candidates, self.label(row))  # MeZO's BoolQTemplateV3
