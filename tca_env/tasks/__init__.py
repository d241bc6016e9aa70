"""Task registry: ``make_task("copy", seq_len=256)``.

Each task is one file; it samples :class:`Batch` objects and imports no model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .activity import ActivityTask
from .base import HEADS, ORDERINGS, REWARDS, Batch, Task
from .copy import CopyTask
from .gp import GPTask
from .images import ImageCompletionTask, completion_grid, faces_task, mnist_task, plot_completions
from .recall import RecallTask

TASKS: dict[str, Callable[..., Task]] = {
    "copy": CopyTask,
    "gp": GPTask,
    "images": ImageCompletionTask,
    "mnist": mnist_task,
    "faces": faces_task,
    "activity": ActivityTask,
    "recall": RecallTask,
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    TASKS[name] = factory


def make_task(name: str, **options) -> Task:
    """Build a task by name, or from your own code as ``"package.module:ClassOrFactory"``.

    Unknown names and unknown options raise errors that list what exists.
    """
    factory = _import_task(name) if ":" in name else TASKS.get(name)
    if factory is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}, or 'package.module:YourTask'")
    try:
        task = factory(**options)
    except TypeError as e:
        raise TypeError(f"bad options for task {name!r}: {e}") from e
    if not isinstance(task, Task):
        raise TypeError(f"task {name!r} built a {type(task).__name__}, not a tca_env.tasks.Task")
    return task


def _import_task(spec: str) -> Callable[..., Task]:
    """``"package.module:Name"`` -> the class or factory it names (the module must be importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a task from your own code is 'package.module:Name'; got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"task {spec!r}: cannot import module {module_name!r} ({e})") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"task {spec!r}: module {module_name!r} has no {attr!r}") from None


__all__ = ["Batch", "Task", "TASKS", "HEADS", "ORDERINGS", "REWARDS", "make_task", "register_task",
           "CopyTask", "GPTask", "ImageCompletionTask", "ActivityTask", "RecallTask", "completion_grid",
           "plot_completions"]
