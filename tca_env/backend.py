"""The one dispatch point that picks how the model's entry points run: ``ReTreever.predict`` (greedy
inference), ``ReTreever.query`` (greedy inference on a built tree) and ``ReTreever.forward`` (the training step's
forward and losses).

Backends:

* ``"torch"`` (default): PyTorch eager, on any device and dtype.
* ``"compile"``: the same functions through ``torch.compile(fullgraph=True)`` (one graph each, no graph
  breaks; inductor needs a C++ compiler on a CPU and Triton on a GPU). Worth it for fixed-size batches
  (copy, images): every new context or query count compiles a new graph, so tasks whose sizes vary per
  batch (GP regression) recompile until torch falls back to eager. It also serves the chunked build of large
  contexts (:func:`tca_env.tree.aggregate`, called outside any compiled graph): the tree's aggregator runs its
  fixed-size chunks through one compiled graph (the build at 2^20 tokens ~1.2x faster on one CPU thread), and
  ``query`` runs each chunk of queries through one compiled graph (at 2^20 tokens on one CPU thread 0.67x eager's
  time per query with one head, 0.85x with four).

There are no hand-written kernels: none was kept, because a second copy of the math only pays where it
beats both eager and compiled PyTorch by a wide margin on the call it serves, and none did. Asking for
``"kernels"`` is an error that says so.

The choice is made once per process: ``TCA_BACKEND=torch|compile`` in the environment, or
:func:`set_backend` (``tca train --backend``), and :func:`backend` reports it. Where ``compile`` is asked
for but cannot run (no C++ compiler for a CPU build), the package warns and runs eagerly.
"""

from __future__ import annotations

import os
import shutil
import warnings
import weakref
from typing import Any

import torch

BACKENDS = ("torch", "compile")
ENV_VAR = "TCA_BACKEND"

_active: str | None = None
_compiled: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def compile_available() -> bool:
    """Whether ``torch.compile``'s default (inductor) backend can build CPU code here: a C++ compiler."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


def _resolve(name: str, source: str) -> str:
    choice = name.strip().lower()
    if choice == "kernels":
        raise ValueError(f"{source} = 'kernels': this package ships no hand-written kernels (none beat eager and "
                         f"compiled PyTorch by enough to keep a second copy of the math); choose one of {BACKENDS}")
    if choice not in BACKENDS:
        raise ValueError(f"{source} = {name!r} is not a backend; choose one of {BACKENDS}")
    if choice == "compile" and not compile_available():
        warnings.warn("backend 'compile' needs a C++ compiler (c++, g++ or clang++ on PATH, or $CXX) for "
                      "torch.compile on a CPU; none was found, so the model runs eagerly ('torch')", stacklevel=3)
        return "torch"
    return choice


def backend() -> str:
    """The backend in use: ``TCA_BACKEND`` (default ``"torch"``) unless :func:`set_backend` chose one."""
    global _active
    if _active is None:
        _active = _resolve(os.environ.get(ENV_VAR) or "torch", ENV_VAR)
    return _active


def set_backend(name: str | None) -> str:
    """Choose the backend for this process (None: re-read ``TCA_BACKEND``); returns the one that will run."""
    global _active
    _active = None if name is None else _resolve(name, "backend")
    return backend()


def describe() -> str:
    """One line for logs: the backend and what it means here."""
    b = backend()
    return "backend: torch (eager PyTorch)" if b == "torch" else \
        f"backend: compile (torch.compile fullgraph, inductor; torch {torch.__version__})"


def call(module: torch.nn.Module, name: str, *args, **kwargs):
    """Run ``module.<name>(*args, **kwargs)`` on the active backend (compiled once per module and method)."""
    fn = getattr(module, name)
    if backend() == "torch":
        return fn(*args, **kwargs)
    per_module = _compiled.setdefault(module, {})
    if name not in per_module:
        per_module[name] = torch.compile(fn, fullgraph=True)
    return per_module[name](*args, **kwargs)
