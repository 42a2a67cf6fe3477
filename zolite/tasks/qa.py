"""Extractive QA as generation, with MeZO's SQuAD template: trained on the gold answer's LM loss, scored by
F1 / EM of a greedy answer (official SQuAD v1.1 normalisation)."""
from __future__ import annotations

from .base import Example, Task


class SQuAD(Task):
    name = "squad"
    description = "SQuAD v1.1 (generation): 'Title: ..\\nContext: ..\\nQuestion: ..\\nAnswer:' -> greedy answer, F1/EM"
    fields = ("title", "context", "question", "answers")
    hf_dataset = ("rajpurkar/squad",)
    metric = "f1"
    generative = True

    def expand(self, row):
        """One SQuAD article ({title, paragraphs: [{context, qas}]}) -> one row per question."""
        if "paragraphs" not in row:   # already flat (HF datasets: answers = {text: [...], answer_start: [...]})
            return [row]
        return [{"title": row["title"], "context": p["context"], "question": qa["question"], "id": qa["id"],
                 "answers": [a["text"] for a in qa["answers"]], "_line": row.get("_line")}
                for p in row["paragraphs"] for qa in p["qas"]]

    def golds(self, row):
        answers = row["answers"]
        answers = answers["text"] if isinstance(answers, dict) else answers
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError("answers must be a non-empty list of strings")
        return list(answers)

    def label(self, row):
        return 0

    def example(self, row):
        prompt = f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question'].strip()}\nAnswer:"
        return Example(prompt, (f" {self.golds(row)[0]}\n",), 0)
