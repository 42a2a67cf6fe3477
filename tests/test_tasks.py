"""Each task's template renders a real row of ../shared/data into MeZO's prompt and candidates."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SHARED_DATA
from zolite.data import iter_rows, sample_splits
from zolite.errors import ZoliteError
from zolite.tasks import TASKS, get_task

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")


def first_row(task):
    return next(iter_rows(SHARED_DATA / task / "train.jsonl.gz"))


@needs_shared
def test_rte_cb_wic_wsc_render_real_rows():
    rte = get_task("rte").example(first_row("rte"))
    assert rte.prompt == ('No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that "Weapons of Mass '
                          'Destruction Found in Iraq." is true? Yes or No?\n')
    assert rte.candidates == ("Yes", "No") and rte.label == 1          # not_entailment -> No
    cb = get_task("cb").example(first_row("cb"))
    assert cb.prompt.startswith("Suppose It was a complex language.")
    assert cb.prompt.endswith('Can we infer that "the language was peeled down"? Yes, No, or Maybe?\n')
    assert cb.candidates == ("Yes", "No", "Maybe") and cb.label == 0   # entailment -> Yes
    wic = get_task("wic").example(first_row("wic"))
    assert wic.prompt == ('Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
                          "Do you want to come over to my place later?\n"
                          "A political system with no place for the less prominent groups.\n")
    assert wic.label == 0
    wsc = get_task("wsc").example(first_row("wsc"))
    assert wsc.prompt.endswith('\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n')
    assert wsc.candidates == ("No", "Yes") and wsc.label == 0


@needs_shared
def test_copa_has_per_example_candidates():
    copa = get_task("copa").example(first_row("copa"))
    assert copa.prompt == "My body cast a shadow over the grass because"
    assert copa.candidates == (" the sun was rising.", " the grass was cut.") and copa.label == 0


@needs_shared
def test_multirc_expands_paragraphs_into_answers():
    task = get_task("multirc")
    line = first_row("multirc")
    rows = task.expand(line)
    n_answers = sum(len(q["answers"]) for q in line["passage"]["questions"])
    assert len(rows) == n_answers and all(r["_line"] == 1 for r in rows)
    ex = task.example(rows[0])
    q = line["passage"]["questions"][0]
    assert ex.prompt == (f"{line['passage']['text']}\nQuestion: {q['question']}\nI found this answer "
                         f"\"{q['answers'][0]['text']}\". Is that correct? Yes or No?\n")
    assert ex.label == q["answers"][0]["label"]
    splits = sample_splits(SHARED_DATA / "multirc" / "train.jsonl.gz", validate=task.validate, expand=task.expand)
    assert splits.total_rows == 27243 and splits.counts == {"train": 1000, "val": 500, "test": 1000}


def test_labels_outside_the_task_are_named(tmp_path):
    f = tmp_path / "rte.jsonl"
    f.write_text('{"premise": "a", "hypothesis": "b", "label": "maybe"}\n' * 5)
    with pytest.raises(ZoliteError, match=r"line \d+: cannot build a rte example .*not one of entailment"):
        sample_splits(f, validate=get_task("rte").validate)


def test_every_task_has_a_description():
    assert all(t.description and t.name == name for name, t in TASKS.items())


def test_tasks_lists_each_tasks_fields_and_a_field_read_beyond_them_is_named(tmp_path):
    from conftest import run_cli

    listed = run_cli("tasks").output
    assert "fields: passage, question, label" in listed and "fields: word, sentence1, sentence2, label" in listed
    f = tmp_path / "wsc.jsonl"   # WSC's spans sit under "target" or at the top level: not in its fields
    f.write_text('{"text": "Mark told Pete he was late.", "label": true, "target": {"span1_text": "Pete"}}\n' * 5)
    with pytest.raises(ZoliteError, match=r"line 1: missing field 'span2_text' needed by task wsc"):
        sample_splits(f, validate=get_task("wsc").validate)


@needs_shared
@pytest.mark.parametrize("task", ["copa", "cb", "multirc"])
def test_multi_token_and_three_way_candidates_tune_and_score(task, tiny_model, tmp_path):
    import zolite

    report = zolite.tune(tiny_model, task, data=str(SHARED_DATA), run_dir=tmp_path / task, layer="1", steps=2,
                         eval_every=0, batch_size=4, lr=1e-2, progress=False, eval_test=True)
    assert len(report["loss_curve"]) == 2 and all(x == x for x in report["loss_curve"])
    assert 0 <= report["final"]["test"]["accuracy"] <= 1 and report["final"]["test"]["n"] == report["data"]["counts"]["test"]


@needs_shared
def test_squad_renders_and_tunes_with_the_lm_loss(tiny_model, tmp_path):
    import zolite
    from conftest import run_cli

    task = get_task("squad")
    rows = task.expand(next(iter_rows(SHARED_DATA / "squad" / "train.json.gz")))
    ex = task.example(rows[0])
    assert ex.prompt.startswith(f"Title: {rows[0]['title']}\nContext: ") and ex.prompt.endswith("\nAnswer:")
    assert ex.candidates == (f" {rows[0]['answers'][0]}\n",)
    report = zolite.tune(tiny_model, "squad", data=str(SHARED_DATA), run_dir=tmp_path / "sq", layer="1", steps=2,
                         eval_every=0, batch_size=2, progress=False)
    assert report["config"]["objective"] == "lm" and report["final"]["val"]["metric"] == "f1"
    assert 0 <= report["final"]["val"]["em"] <= report["final"]["val"]["f1"] <= 1 and report["final"]["val"]["n"] == 500
    r = run_cli("tune", "--model", tiny_model, "--task", "squad", "--data", SHARED_DATA, "--layer", "1",
                "--objective", "ce", "--run-dir", tmp_path / "ce", "--steps", "1")
    assert r.exit_code == 2 and "generation task" in r.output and "--objective lm" in r.output


@needs_shared
def test_record_renders_mezo_template_with_entity_candidates():
    task = get_task("record")
    line = first_row("record")
    rows = task.expand(line)
    assert len(rows) == len(line["qas"]) == 1
    ex = task.example(rows[0])
    text = line["passage"]["text"]
    assert ex.prompt == text.replace("@highlight\n", "- ") + "\n-" and "@highlight" not in ex.prompt
    entities = list(dict.fromkeys(text[e["start"]:e["end"] + 1] for e in line["passage"]["entities"]))
    assert len(ex.candidates) == len(entities) == 19            # 30 entity spans, 19 distinct
    query = line["qas"][0]["query"]
    assert ex.candidates[0] == " " + query.replace("@placeholder", "Hamish Mackay")
    gold = entities.index("Olimpija Ljubljana")
    assert ex.label == gold and ex.accepted == (gold,)
    splits = sample_splits(SHARED_DATA / "record" / "train.jsonl.gz", validate=task.validate, expand=task.expand)
    assert splits.total_rows == 64 and splits.counts == {"train": 25, "val": 12, "test": 27}


def test_record_accepts_the_hf_release_and_every_gold_entity():
    task = get_task("record")
    row = {"passage": "Ann met Bob.\n@highlight\nBob is here", "query": "@placeholder waved.",
           "entities": ["Ann", "Bob", "Ann"], "answers": ["Bob", "Ann"], "idx": {"passage": 0, "query": 0}}
    assert task.expand(row) == [row]
    ex = task.example(row)
    assert ex.prompt == "Ann met Bob.\n- Bob is here\n-"
    assert ex.candidates == (" Ann waved.", " Bob waved.") and ex.label == 1 and set(ex.correct()) == {0, 1}
    with pytest.raises(ZoliteError, match="no gold answer is among"):
        task.validate({**row, "answers": ["Cy"]}, "f.jsonl")


DROP_FIXTURE = Path(__file__).parent / "fixtures" / "drop_handwritten.json"   # hand-written, not DROP data


def test_drop_reads_the_official_json_schema():
    task = get_task("drop")
    lines = list(iter_rows(DROP_FIXTURE))
    assert lines[0]["passage_id"] == "handwritten_harbour" and lines[0]["_line"] == 1
    rows = [r for line in lines for r in task.expand(line)]
    assert len(rows) == 10
    ex = task.example(rows[0])
    assert ex.prompt == (f"Passage: {lines[0]['passage']}\nQuestion: How many more inhabitants did Elmsby have "
                         "in 1750 than in 1700?\nAnswer:")
    assert ex.candidates == (" 570\n",)
    assert task.golds(rows[1]) == [["fishermen from Kestrel Point"], ["fishermen"]]
    assert task.golds(rows[2]) == [["3 March 1856"]]                      # a date answer
    assert task.golds(rows[5]) == [["Mara Venn", "Tobi Ash", "Lio Park"]]  # one answer of three spans
    assert task.example(rows[5]).candidates == (" Mara Venn, Tobi Ash, Lio Park\n",)
    splits = sample_splits(DROP_FIXTURE, validate=task.validate, expand=task.expand)
    # passages are dealt whole (no passage in two splits), so the last split can fall short of its 4 rows
    assert splits.counts == {"train": 2, "val": 2, "test": 4}
    passages = [{r["passage"] for r in rows} for rows in (splits.train, splits.val, splits.test)]
    assert not (passages[0] & passages[1] or passages[0] & passages[2] or passages[1] & passages[2])


def test_drop_accepts_the_hf_release():
    task = get_task("drop")
    row = {"section_id": "s", "query_id": "q", "passage": "P", "question": "Q?",
           "answers_spans": {"spans": ["Ann", "Bob"], "types": ["span", "span"]}}
    (flat,) = task.expand(row)
    assert task.golds(flat) == [["Ann"], ["Bob"]]
    assert task.example(flat).prompt == "Passage: P\nQuestion: Q?\nAnswer:"


def test_drop_tunes_on_the_hand_written_fixture_with_the_f1_objective(tiny_model, tmp_path):
    import zolite

    report = zolite.tune(tiny_model, "drop", data=str(DROP_FIXTURE), run_dir=tmp_path / "drop", layer="1", steps=2,
                         eval_every=1, batch_size=2, objective="f1", eps=1e-1, lr=1e-6, progress=False,
                         eval_test=True)
    assert report["config"]["objective"] == "f1" and report["final"]["test"]["metric"] == "f1"
    assert all(-1.0 <= x <= 0.0 for x in report["loss_curve"]) and len(report["loss_curve"]) == 2
    assert report["final"]["test"]["n"] == 4
