"""The task registry: `get_task(name)`."""
from __future__ import annotations

from ..errors import ZoliteError
from .base import Example, Task
from .custom import CustomTask, is_custom, spec_from
from .glue import SST2, BoolQ
from .qa import DROP, SQuAD
from .superglue import CB, COPA, RTE, WSC, MultiRC, ReCoRD, WiC

TASKS: dict[str, Task] = {t.name: t for t in (SST2(), BoolQ(), RTE(), CB(), WSC(), WiC(), MultiRC(), COPA(),
                                                 ReCoRD(), SQuAD(), DROP())}


def get_task(name: str, *, template=None, candidates=None, label_field=None, answer_field=None,
             need_data: bool = True) -> Task:
    """A built-in task by name, or a custom one from a .jsonl file (+ template options) or a .toml task file.
    need_data=False: a custom task's data file may be absent (to apply a patch, not to tune)."""
    if is_custom(name):
        return CustomTask(spec_from(name, template, candidates, label_field, answer_field, need_data))
    if name not in TASKS:
        raise ZoliteError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}, "
                          "or a .jsonl file with --template, or a .toml task file")
    if template is not None or candidates is not None or answer_field is not None:
        raise ZoliteError(f"--template/--candidates/--answer-field define a custom task; {name} has its own template")
    return TASKS[name]


def task_data(task: Task, data_dir: str | None):
    """The file a task reads: a custom task's own file, else --data / datasets / the bundled sample."""
    from ..data import find_data

    if isinstance(task, CustomTask):
        return task.spec.data
    return find_data(task.name, data_dir, task.hf_dataset)


__all__ = ["Example", "Task", "TASKS", "CustomTask", "get_task", "task_data"]
