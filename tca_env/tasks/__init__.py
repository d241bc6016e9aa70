"""Task registry: ``make_task("copy", seq_len=256)``.

Each task is one file; it samples :class:`Batch` objects and imports no model.
"""

from __future__ import annotations

from collections.abc import Callable

from .activity import ActivityTask
from .base import HEADS, ORDERINGS, REWARDS, Batch, Task
from .copy import CopyTask
from .gp import GPTask
from .images import ImageCompletionTask, completion_grid, faces_task, mnist_task, plot_completions

TASKS: dict[str, Callable[..., Task]] = {
    "copy": CopyTask,
    "gp": GPTask,
    "images": ImageCompletionTask,
    "mnist": mnist_task,
    "faces": faces_task,
    "activity": ActivityTask,
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    TASKS[name] = factory


def make_task(name: str, **options) -> Task:
    """Build a task by name; unknown names and unknown options raise errors that list what exists."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError as e:
        raise TypeError(f"bad options for task {name!r}: {e}") from e


__all__ = ["Batch", "Task", "TASKS", "HEADS", "ORDERINGS", "REWARDS", "make_task", "register_task",
           "CopyTask", "GPTask", "ImageCompletionTask", "ActivityTask", "completion_grid", "plot_completions"]
