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
  time per query with one head; with four, 1.05x on the oneDNN matmul route below and 0.85x on the BLAS's).

There are no hand-written kernels: none was kept, because a second copy of the math only pays where it
beats both eager and compiled PyTorch by a wide margin on the call it serves, and none did. Asking for
``"kernels"`` is an error that says so.

The choice is made once per process: ``TCA_BACKEND=torch|compile`` in the environment, or
:func:`set_backend` (``tca train --backend``), and :func:`backend` reports it. Where ``compile`` is asked
for but cannot run (no C++ compiler for a CPU build), the package warns and runs eagerly.

Matmul route (on either backend): PyTorch sends float32 matrix products on a CPU to its BLAS (MKL in the
official wheels) unless oneDNN's "bf16" math mode is on (``torch.backends.mkldnn.matmul.fp32_precision``),
which lets oneDNN take them and *permits* it to round the inputs to bfloat16. Where the CPU has no bfloat16
matrix unit (AMX), oneDNN computes them in float32 anyway: on the AMD EPYC (Zen 5) we measure on, with
results equal to the BLAS's up to summation order and ~2.3x faster at the model's shapes (4,096 x 64 by
64 x 256: 0.58 against 1.36 ms; MKL runs a slow code path on AMD CPUs), the tree build at 2^20 tokens in
2.9-3.2 s against 4.3 s. :func:`matmul_scope` turns that route on around the large calls (the build, the
queries, the model's forward, the trainer's backward, the env's leaf read-out) when :func:`matmul_route` is
``"onednn"``. ``TCA_MATMUL=auto`` (the
default, or :func:`set_matmul`) chooses it only where a probe run once per process finds oneDNN's products as
exact as the BLAS's (within 4x its float32 error against float64, at the model's shapes) and at least 1.25x
faster; ``onednn`` forces it (it may round to bfloat16 on CPUs with AMX); ``default`` never uses it.
Small products keep the BLAS (each oneDNN call costs ~14 us more here: 17 against 3 us for 1 x 64 by 64 x 256).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
import warnings
import weakref
from collections.abc import Iterator
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
    line = "backend: torch (eager PyTorch)" if b == "torch" else \
        f"backend: compile (torch.compile fullgraph, inductor; torch {torch.__version__})"
    route = matmul_route()
    why = f" ({onednn_probe()[1]})" if _matmul_asked.strip().lower() == "auto" else ""
    return f"{line}; CPU matmuls: {route}{why}"


def call(module: torch.nn.Module, name: str, *args, **kwargs):
    """Run ``module.<name>(*args, **kwargs)`` on the active backend (compiled once per module and method)."""
    fn = getattr(module, name)
    if backend() == "torch":
        return fn(*args, **kwargs)
    per_module = _compiled.setdefault(module, {})
    if name not in per_module:
        per_module[name] = torch.compile(fn, fullgraph=True)
    return per_module[name](*args, **kwargs)


# ------------------------------------------------------------------------------------------ matmul route

MATMUL_ROUTES = ("auto", "onednn", "default")
MATMUL_ENV_VAR = "TCA_MATMUL"
#: a scope with fewer rows than this keeps the BLAS: below ~100 rows per product oneDNN's fixed cost per call
#: outweighs its faster kernel here, and a block of this many rows in all has products both small and large
onednn_min_rows = 1024

_matmul: str | None = None
_matmul_asked = "auto"


def _knob():
    """``torch.backends.mkldnn.matmul`` where this torch has the per-backend float32 precision (2.9 and later)."""
    knob = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    try:
        knob.fp32_precision  # noqa: B018
    except (AttributeError, RuntimeError):
        return None
    return knob if torch.backends.mkldnn.is_available() else None


@functools.cache
def onednn_probe() -> tuple[bool, str]:
    """Whether oneDNN's float32 products are as exact as the BLAS's and faster here, and why (run once, ~0.05 s).

    Exact: on each of the model's shapes, the largest error against float64 at most 4x the BLAS's (a product
    whose inputs are rounded to bfloat16 errs ~1,000x more). Faster: at 1,024 x 64 by 64 x 256, the fastest of
    5 calls at most 0.8x the BLAS's.
    """
    knob = _knob()
    if knob is None:
        return False, "this torch has no oneDNN float32 matmul setting (torch.backends.mkldnn.matmul)"
    g = torch.Generator().manual_seed(0)
    shapes = ((1024, 64, 256), (1024, 256, 64), (1024, 68, 64), (256, 64, 64))
    data = [(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)) for m, k, n in shapes]
    prev = knob.fp32_precision
    try:
        for a, w in data:
            ref = a.double() @ w.double().T
            knob.fp32_precision = "ieee"
            err_blas = float((a @ w.T - ref).abs().max())
            knob.fp32_precision = "bf16"
            err = float((a @ w.T - ref).abs().max())
            if err > 4 * err_blas + 1e-6:
                return False, (f"oneDNN rounds float32 products here ({err:.1e} against {err_blas:.1e} for "
                               f"{tuple(a.shape)} x {tuple(w.T.shape)})")
        a, w = data[0]
        best = {}
        for mode in ("ieee", "bf16") * 5:
            knob.fp32_precision = mode
            t = time.perf_counter()
            a @ w.T
            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t)
    finally:
        knob.fp32_precision = prev
    ratio = best["bf16"] / best["ieee"]
    if ratio > 0.8:
        return False, f"oneDNN is not faster here ({ratio:.2f}x the BLAS's time)"
    return True, f"oneDNN exact and {1 / ratio:.1f}x faster than the BLAS"


def _resolve_matmul(name: str, source: str) -> str:
    choice = name.strip().lower()
    if choice not in MATMUL_ROUTES:
        raise ValueError(f"{source} = {name!r} is not a matmul route; choose one of {MATMUL_ROUTES}")
    if choice == "onednn" and _knob() is None:
        warnings.warn(f"matmul route 'onednn': {onednn_probe()[1]}; using the default route", stacklevel=3)
        return "default"
    if choice == "auto":
        return "onednn" if onednn_probe()[0] else "default"
    return choice


def matmul_route() -> str:
    """``"onednn"`` or ``"default"``: the route :func:`matmul_scope` takes (``TCA_MATMUL``, default ``auto``)."""
    global _matmul, _matmul_asked
    if _matmul is None:
        _matmul_asked = os.environ.get(MATMUL_ENV_VAR) or "auto"
        _matmul = _resolve_matmul(_matmul_asked, MATMUL_ENV_VAR)
    return _matmul


def set_matmul(name: str | None) -> str:
    """Choose the matmul route for this process (None: re-read ``TCA_MATMUL``); returns the one taken."""
    global _matmul, _matmul_asked
    if name is not None:
        _matmul, _matmul_asked = _resolve_matmul(name, "matmul"), name
    else:
        _matmul = None
    return matmul_route()


@contextlib.contextmanager
def matmul_scope(rows: int) -> Iterator[None]:
    """Float32 CPU matrix products inside take oneDNN's kernels where :func:`matmul_route` is ``"onednn"`` and the
    block works on at least :data:`onednn_min_rows` rows (tokens or queries in all); otherwise nothing changes.
    Nests (the previous setting is restored on exit). Other devices and dtypes are not affected.

    The model enters it around its large calls (``ReTreever.build``, ``prepare``'s query embedding, ``query``,
    ``predict``, ``forward``), the trainer around the backward and the env around its leaf read-out. Measured
    here: recall at 2^20, the tca build in 2.9-3.2 against 4.3 s; on the copy task (L = 1,024, batch 16) training
    steps of tca / ca / Perceiver IO at 0.84 / 0.86 / 0.69x the BLAS route's time. Fused attention over many
    keys with few queries is slower on oneDNN (ca at 2^16 tokens with 64 queries: 611 against 349 us per query;
    with 1,024 queries 209 against 253 us), which the row threshold leaves on the BLAS route."""
    if rows < onednn_min_rows or matmul_route() != "onednn":
        yield
        return
    knob = _knob()
    prev = knob.fp32_precision
    knob.fp32_precision = "bf16"
    try:
        yield
    finally:
        knob.fp32_precision = prev
