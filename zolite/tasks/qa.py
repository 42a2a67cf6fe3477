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


class DROP(Task):
    """MeZO's DROPTemplate. Golds: the answer and every validated answer, each a list of spans; scored by the
    official drop_eval rules (numbers normalised, multi-span answers aligned bag by bag)."""
    name = "drop"
    description = "DROP (generation): 'Passage: ..\\nQuestion: ..\\nAnswer:' -> greedy answer, F1/EM (drop_eval rules)"
    fields = ("passage", "question", "answers")
    hf_dataset = ("ucinlp/drop",)
    metric = "f1"
    generative = True

    def expand(self, row):
        """One passage of DROP's JSON ({passage, qa_pairs: [{question, answer, validated_answers}]}) or one
        row of the HF release ({passage, question, answers_spans: {spans}}) -> flat rows, answers = [[spans]]."""
        from ..metrics import drop_answer_spans

        if "qa_pairs" in row:
            return [{"passage": row["passage"], "question": qa["question"], "query_id": qa.get("query_id"),
                     "answers": [s for s in map(drop_answer_spans, [qa["answer"], *qa.get("validated_answers", [])])
                                 if s], "_line": row.get("_line")}
                    for qa in row["qa_pairs"]]
        if "answers_spans" in row and "answers" not in row:   # HF: each span is an accepted answer, as in MeZO
            return [{**row, "answers": [[s] for s in row["answers_spans"]["spans"]]}]
        return [row]

    def golds(self, row):
        answers = row["answers"]
        if not answers or not all(isinstance(a, list) and a and all(isinstance(s, str) for s in a) for a in answers):
            raise ValueError("answers must be a non-empty list of answers, each a non-empty list of strings")
        return answers

    def answer_scores(self, prediction, golds):
        from ..metrics import drop_scores

        scores = [drop_scores(prediction, g) for g in golds]
        return max(s[0] for s in scores), max(s[1] for s in scores)

    def label(self, row):
        return 0

    def example(self, row):
        prompt = f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:"
        return Example(prompt, (f" {', '.join(self.golds(row)[0])}\n",), 0)
