"""SuperGLUE classification and multiple-choice tasks with MeZO's templates
(princeton-nlp/MeZO, large_models/templates.py and tasks.py). Candidate order = label index."""
from __future__ import annotations

from .base import Example, Task, bool_label


def _named_label(value, names: tuple[str, ...]) -> int:
    """A label given as its name ("entailment") or as its index in the HF datasets release."""
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    raise ValueError(f"label {value!r} is not one of {', '.join(names)}")


class RTE(Task):
    name = "rte"
    description = "RTE entailment (SuperGLUE): '<premise>\\nDoes this mean that \"<hypothesis>\" is true? Yes or No?\\n' -> Yes | No"
    fields = ("premise", "hypothesis", "label")
    hf_dataset = ("super_glue", "rte")
    candidates = ("Yes", "No")

    def label(self, row):
        return _named_label(row["label"], ("entailment", "not_entailment"))

    def example(self, row):
        prompt = f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"
        return Example(prompt, self.candidates, self.label(row))


class CB(Task):
    name = "cb"
    description = "CommitmentBank (SuperGLUE): 'Suppose <premise> Can we infer that \"<hypothesis>\"? ...' -> Yes | No | Maybe"
    fields = ("premise", "hypothesis", "label")
    hf_dataset = ("super_glue", "cb")
    candidates = ("Yes", "No", "Maybe")

    def label(self, row):
        return _named_label(row["label"], ("entailment", "contradiction", "neutral"))

    def example(self, row):
        prompt = f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"
        return Example(prompt, self.candidates, self.label(row))


class WiC(Task):
    name = "wic"
    description = "Word-in-Context (SuperGLUE): same sense of <word> in two sentences? -> No | Yes"
    fields = ("word", "sentence1", "sentence2", "label")
    hf_dataset = ("super_glue", "wic")
    candidates = ("No", "Yes")

    def label(self, row):
        return bool_label(row["label"])

    def example(self, row):
        prompt = (f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
                  f"{row['sentence1']}\n{row['sentence2']}\n")
        return Example(prompt, self.candidates, self.label(row))


class WSC(Task):
    name = "wsc"
    description = "Winograd schema (SuperGLUE): does the pronoun <span2_text> refer to <span1_text>? -> No | Yes (spans flat or under target)"
    fields = ("text", "label")
    hf_dataset = ("super_glue", "wsc.fixed")
    candidates = ("No", "Yes")

    def label(self, row):
        return bool_label(row["label"])

    def example(self, row):
        spans = row.get("target", row)   # SuperGLUE JSONL nests the spans under "target"; HF datasets does not
        prompt = (f"{row['text']}\nIn the previous sentence, does the pronoun \"{spans['span2_text'].lower()}\" "
                  f"refer to {spans['span1_text']}? Yes or No?\n")
        return Example(prompt, self.candidates, self.label(row))


class COPA(Task):
    """MeZO's CopaTemplate ("correct" capitalisation). MeZO ends the prompt with the conjunction's space; here the
    space starts the candidate instead, so the scored text is the same but BPE tokens do not straddle the boundary."""
    name = "copa"
    description = "COPA (SuperGLUE): '<premise> so|because' -> choice1 | choice2 (each example has its own candidates)"
    fields = ("premise", "choice1", "choice2", "question", "label")
    hf_dataset = ("super_glue", "copa")

    def label(self, row):
        label = row["label"]
        if label not in (0, 1) or isinstance(label, bool):
            raise ValueError(f"label {label!r} is not 0 or 1")
        return label

    @staticmethod
    def _choice(text: str) -> str:
        words = text.split(" ")
        if words[0] != "I":
            words[0] = words[0].lower()
        return " " + " ".join(words)

    def example(self, row):
        conjunction = {"effect": " so", "cause": " because"}[row["question"]]
        premise = row["premise"].rstrip()
        premise = premise[:-1] if premise.endswith(".") else premise
        return Example(premise + conjunction, (self._choice(row["choice1"]), self._choice(row["choice2"])),
                       self.label(row))


class MultiRC(Task):
    name = "multirc"
    description = "MultiRC (SuperGLUE): is the proposed answer to the question correct? -> No | Yes (one example per answer)"
    fields = ("paragraph", "question", "answer", "label")
    hf_dataset = ("super_glue", "multirc")
    candidates = ("No", "Yes")

    def expand(self, row):
        """One SuperGLUE line (a paragraph with its questions and answers) -> one row per answer."""
        if "passage" not in row:   # already flat (HF datasets release or a hand-made file)
            return [row]
        out = []
        for q in row["passage"]["questions"]:
            for a in q["answers"]:
                out.append({"paragraph": row["passage"]["text"], "question": q["question"], "answer": a["text"],
                            "label": a["label"], "_line": row.get("_line")})
        return out

    def label(self, row):
        return bool_label(row["label"])

    def example(self, row):
        prompt = (f"{row['paragraph']}\nQuestion: {row['question']}\nI found this answer \"{row['answer']}\". "
                  "Is that correct? Yes or No?\n")
        return Example(prompt, self.candidates, self.label(row))


class ReCoRD(Task):
    """MeZO's ReCoRDTemplateGPT3: the passage (highlights as '- ' bullets), then '\\n-', then the query with
    @placeholder filled by each candidate entity. Correct when the best entity is any of the gold answers."""
    name = "record"
    description = "ReCoRD (SuperGLUE): '<passage>\\n-' -> ' <query with @placeholder = entity>' for each entity"
    fields = ("passage", "query", "entities", "answers")
    hf_dataset = ("super_glue", "record")
    per_class = False

    def expand(self, row):
        """One SuperGLUE line (a passage with entity spans and queries) -> one row per query."""
        if not isinstance(row.get("passage"), dict):   # already flat (HF datasets release)
            return [row]
        text = row["passage"]["text"]
        entities = [text[e["start"]:e["end"] + 1] for e in row["passage"]["entities"]]   # `end` is inclusive
        return [{"passage": text, "query": qa["query"], "entities": entities,
                 "answers": [a["text"] for a in qa.get("answers", [])], "_line": row.get("_line")}
                for qa in row["qas"]]

    def label(self, row):
        return self._accepted(row)[1][0]

    @staticmethod
    def _accepted(row) -> tuple[list[str], list[int]]:
        entities = list(dict.fromkeys(row["entities"]))   # unique, in passage order
        accepted = [entities.index(a) for a in dict.fromkeys(row["answers"]) if a in entities]
        if not accepted:
            raise ValueError("no gold answer is among the passage's entities")
        return entities, accepted

    def example(self, row):
        if "@placeholder" not in row["query"]:
            raise ValueError("the query has no @placeholder")
        entities, accepted = self._accepted(row)
        passage = row["passage"].replace("@highlight\n", "- ")
        candidates = tuple(" " + row["query"].replace("@placeholder", e) for e in entities)
        return Example(f"{passage}\n-", candidates, accepted[0], tuple(accepted))
