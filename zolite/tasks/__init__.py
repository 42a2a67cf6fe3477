"""The task registry: `get_task(name)`."""
from __future__ import annotations

from ..errors import ZoliteError
from .base import Example, Task
from .glue import SST2, BoolQ
from .qa import SQuAD
from .superglue import CB, COPA, RTE, WSC, MultiRC, WiC

TASKS: dict[str, Task] = {t.name: t for t in (SST2(), BoolQ(), RTE(), CB(), WSC(), WiC(), MultiRC(), COPA(),
                                                 SQuAD())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ZoliteError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["Example", "Task", "TASKS", "get_task"]
