"""Optional fused CPU kernels for TCA, compiled from ``csrc/kernels.c`` on first use.

Why: with plain tensor ops the tree search is bandwidth-bound (each level gathers the children's key
rows of every query into a fresh tensor, and the read-out gathers S again), and the aggregator's
tiny child sets turn one Transformer layer into dozens of elementwise passes. The kernels walk each
query down the tree and attend over its S in one pass, with the forward and backward of the sampled
search for training, and run the aggregator's elementwise work (children self-attention, layer
norms, residual, masked means) as single passes between the layer's matrix products.

How: the source is compiled once per machine with the system C compiler (``cc``, or ``$CC``) into a
cache directory (``$TCA_KERNEL_CACHE``, default ``~/.cache/tca_env``), written atomically, and loaded
with ctypes; calls release the GIL, so ranges of rows run on ``torch.get_num_threads()`` Python threads.
Nothing here is required: without a compiler, with ``TCA_KERNELS=0``, inside :func:`disabled`, or for
tensors that are not float32 CPU tensors, the callers use the PyTorch code path (which also defines the
results: tests/test_kernels.py compares the two, values and gradients).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "kernels.c"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math",
         "-Werror=implicit-function-declaration", "-fPIC", "-shared"]

DH_MAX = 256
"""Largest head width the C read-out handles (``DH_MAX`` in kernels.c)."""

_lib: ctypes.CDLL | None = None
_tried = False
_enabled = True
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (threads, pid): a forked child gets its own pool
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (a shared home directory may be
    mounted on machines with different CPUs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("TCA_KERNEL_CACHE", Path.home() / ".cache" / "tca_env"))


def _compile(compiler: str, flags: list[str]) -> Path:
    """The shared library for these flags, from the cache or freshly built (atomically)."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([compiler, *flags]).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = _cache_dir() / f"tca_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent or interrupted build never leaves a partial file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    try:
        target = _compile(compiler, FLAGS)
    except RuntimeError:
        # some compilers / targets reject -march=native: retry with the generic instruction set
        target = _compile(compiler, [f for f in FLAGS if f != "-march=native"])
    lib = ctypes.CDLL(str(target))
    lib.tca_greedy_readout.restype = _INT
    lib.tca_greedy_readout.argtypes = [_I64, _INT, _INT, _INT, _INT, _INT, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                       _I64, _I64]
    lib.tca_search_readout_fwd.restype = None
    lib.tca_search_readout_fwd.argtypes = [_I64, _INT, _INT, _INT, _INT, _INT] + [_P] * 13 + [_I64, _I64]
    lib.tca_search_readout_bwd.restype = None
    lib.tca_search_readout_bwd.argtypes = [_I64, _INT, _INT, _INT, _INT, _INT] + [_P] * 16 + [_I64, _I64]
    lib.tca_norm_rows.restype = None
    lib.tca_norm_rows.argtypes = [_INT, _P, _P, _P, ctypes.c_float, _P, _P, _I64, _I64]
    lib.tca_residual_norm_mean.restype = None
    lib.tca_residual_norm_mean.argtypes = [_INT, _INT, _P, _P, _P, _P, ctypes.c_float, _P, _P, _P, _P, _I64, _I64]
    lib.tca_relu_mean.restype = None
    lib.tca_relu_mean.argtypes = [_INT, _INT, _P, _P, _P, _I64, _I64]
    lib.tca_norm_backward.restype = None
    lib.tca_norm_backward.argtypes = [_INT, _P, _P, _P, _P, _P, _P, _P, _I64, _I64]
    lib.tca_expand_rows.restype = None
    lib.tca_expand_rows.argtypes = [_INT, _P, _P, _P, _P, _P, _I64, _I64]
    lib.tca_group_attention.restype = None
    lib.tca_group_attention.argtypes = [_INT, _INT, _INT, ctypes.c_float, _P, _P, _P, _I64, _I64]
    lib.tca_group_attention_bwd.restype = None
    lib.tca_group_attention_bwd.argtypes = [_INT, _INT, _INT, ctypes.c_float, _P, _P, _P, _P, _I64, _I64]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they are disabled or cannot be built (warned once)."""
    global _lib, _tried
    if not _enabled or os.environ.get("TCA_KERNELS", "1") == "0":
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except (OSError, RuntimeError) as err:
                warnings.warn(f"tca_env: fused CPU kernels unavailable, using the PyTorch path ({err})",
                              RuntimeWarning, stacklevel=2)
                _lib = None
            _tried = True
    return _lib


@contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch code paths inside this block (for comparisons and debugging)."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def usable(*tensors: torch.Tensor) -> bool:
    """True when the kernels may handle these tensors: built, no autograd, float32 CPU tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _get_pool(threads: int) -> ThreadPoolExecutor:
    """The worker threads for kernel calls: rebuilt when the thread count changes or after a fork (a
    child process inherits the pool object but not its threads)."""
    global _pool, _pool_key
    key = (threads, os.getpid())
    if _pool is None or _pool_key != key:
        if _pool is not None and _pool_key[1] == key[1]:
            _pool.shutdown(wait=False)
        _pool, _pool_key = ThreadPoolExecutor(threads, thread_name_prefix="tca-kernels"), key
    return _pool


def _run(fn, n: int, *args) -> None:
    """Call ``fn(*args, start, end)`` over [0, n) split across torch.get_num_threads() threads."""
    threads = max(1, min(torch.get_num_threads(), n // 256 or 1))
    if threads == 1:
        fn(*args, 0, n)
        return
    pool = _get_pool(threads)
    bounds = [n * t // threads for t in range(threads + 1)]
    list(pool.map(lambda t: fn(*args, bounds[t], bounds[t + 1]), range(threads)))


def _run_trees(fn, B: int, M: int, *args) -> None:
    """Like :func:`_run` over [0, B*M) but splitting only between trees (the backward scatters into
    a tree's rows, so two threads must never share a tree)."""
    threads = max(1, min(torch.get_num_threads(), B))
    if threads == 1 or B * M < 256:
        fn(*args, 0, B * M)
        return
    pool = _get_pool(threads)
    bounds = [(B * t // threads) * M for t in range(threads + 1)]
    list(pool.map(lambda t: fn(*args, bounds[t], bounds[t + 1]), range(threads)))


def _u8(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.contiguous().view(torch.uint8)


def greedy_readout(kv, q: torch.Tensor, with_path: bool = False,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Greedy search + read-out of every query: attention ``[B, M, H, dh]`` and (optionally) ``path``.

    ``kv`` is a :class:`tca_env.search.TreeKV`, ``q [B, M, H, dh]`` pre-scaled queries. Same results as
    ``search.descend(kv, q, "greedy")`` followed by ``search.readout`` (up to float rounding).
    Returns ``(None, None)`` for head widths the kernel does not handle (over 256). ``out``: an optional
    contiguous ``[B, M, H, dh]`` float32 tensor to write the read-out into.
    """
    lib = library()
    shape = kv.shape
    B, M, H, dh = q.shape
    q = q.contiguous()
    keys = [t.contiguous() for t in kv.keys]
    values = [t.contiguous() for t in kv.values]
    masks = [_u8(m) for m in kv.masks]
    tk, tv, tm = kv.tok_keys.contiguous(), kv.tok_values.contiguous(), _u8(kv.tok_mask)
    k = shape.k
    arr = _P * max(k, 1)
    kp = arr(*[_ptr(t) for t in keys])
    vp = arr(*[_ptr(t) for t in values])
    mp = arr(*[_ptr(t) for t in masks])
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    path = torch.empty(B, M, k + 1, dtype=torch.long) if with_path else None
    if dh > DH_MAX:
        return None, None
    _run(lib.tca_greedy_readout, B * M, M, H, dh, shape.b, k, shape.P, _ptr(q), kp, vp, mp, _ptr(tk), _ptr(tv),
         _ptr(tm), _ptr(out), _ptr(path))
    return out, path


def _out(out: torch.Tensor | None, like: torch.Tensor, *shape: int) -> torch.Tensor:
    """``out`` checked to be a contiguous float32 tensor of ``shape``, or a new one."""
    if out is None:
        return like.new_empty(*shape)
    if out.numel() != int(torch.Size(shape).numel()) or not out.is_contiguous() or out.dtype != torch.float32:
        raise ValueError(f"out must be a contiguous float32 tensor of {tuple(shape)} elements")
    return out


def group_attention(qkv: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention inside each group: ``qkv [G, c, 3, H, dh]``, ``mask [G, c]`` -> ``[G, c, H, dh]``
    (written into ``out`` when given)."""
    lib = library()
    G, c, _, H, dh = qkv.shape
    qkv = qkv.contiguous()
    m = _u8(mask)
    out = _out(out, qkv, G, c, H, dh)
    _run(lib.tca_group_attention, G, c, H, dh, scale, _ptr(qkv), _ptr(m), _ptr(out))
    return out


def _tables(kv, tensors=None):
    """ctypes pointer arrays for the per-level keys, values and masks of ``kv`` (or of ``tensors``)."""
    k = kv.shape.k
    keys, values = (kv.keys, kv.values) if tensors is None else tensors
    arr = _P * max(k, 1)
    masks = [_u8(m) for m in kv.masks]
    return (arr(*[_ptr(t) for t in keys]), arr(*[_ptr(t) for t in values]), arr(*[_ptr(t) for t in masks]),
            masks)


class SearchReadout(torch.autograd.Function):
    """Sampled / replayed / greedy descent + read-out with log-probability and entropy, and its backward,
    in C. Inputs after the non-tensor ones: ``q``, ``tok_keys``, ``tok_values``, then the k level keys and
    the k level values (all contiguous float32 CPU). Outputs: read-out ``[B, M, H, dh]``, path
    ``[B, M, k+1]``, log_prob ``[B, M]``, entropy ``[B, M]``."""

    @staticmethod
    def forward(ctx, kv, gumbel, actions, q, tok_k, tok_v, *levels):  # noqa: D102
        lib = library()
        shape = kv.shape
        B, M, H, dh = q.shape
        k = shape.k
        keys, values = list(levels[:k]), list(levels[k:])
        kp, vp, mp, masks = _tables(kv, (keys, values))
        tm = _u8(kv.tok_mask)
        out = torch.empty_like(q)
        path = torch.empty(B, M, k + 1, dtype=torch.long)
        logp = q.new_empty(B, M)
        ent = q.new_empty(B, M)
        _run(lib.tca_search_readout_fwd, B * M, M, H, dh, shape.b, k, shape.P, _ptr(q), kp, vp, mp, _ptr(tok_k),
             _ptr(tok_v), _ptr(tm), _ptr(gumbel), _ptr(actions), _ptr(out), _ptr(path), _ptr(logp), _ptr(ent))
        ctx.kv = kv
        ctx.save_for_backward(q, tok_k, tok_v, path, *levels)
        ctx.mark_non_differentiable(path)
        return out, path, logp, ent

    @staticmethod
    def backward(ctx, g_out, g_path, g_logp, g_ent):  # noqa: D102
        lib = library()
        kv = ctx.kv
        q, tok_k, tok_v, path, *levels = ctx.saved_tensors
        shape = kv.shape
        B, M, H, dh = q.shape
        k = shape.k
        keys, values = levels[:k], levels[k:]
        kp, vp, mp, masks = _tables(kv, (keys, values))
        tm = _u8(kv.tok_mask)
        g_out = torch.zeros_like(q) if g_out is None else g_out.contiguous()
        g_logp = None if g_logp is None else g_logp.contiguous()
        g_ent = None if g_ent is None else g_ent.contiguous()
        dq, dtk, dtv = torch.zeros_like(q), torch.zeros_like(tok_k), torch.zeros_like(tok_v)
        dlev = [torch.zeros_like(t) for t in levels]
        arr = _P * max(k, 1)
        dkp = arr(*[_ptr(t) for t in dlev[:k]])
        dvp = arr(*[_ptr(t) for t in dlev[k:]])
        _run_trees(lib.tca_search_readout_bwd, B, M, M, H, dh, shape.b, k, shape.P, _ptr(q), kp, vp, mp,
                   _ptr(tok_k), _ptr(tok_v), _ptr(tm), _ptr(path), _ptr(g_out), _ptr(g_logp), _ptr(g_ent), _ptr(dq),
                   dkp, dvp, _ptr(dtk), _ptr(dtv))
        return (None, None, None, dq, dtk, dtv, *dlev)


def search_readout(kv, q: torch.Tensor, gumbel: torch.Tensor | None, actions: torch.Tensor | None):
    """Fused training search + read-out (see :class:`SearchReadout`); differentiable w.r.t. ``q`` and every
    key / value table of ``kv``. ``gumbel [B, M, k, b]`` samples, ``actions [B, M, k]`` replays, neither:
    greedy. Returns ``(attn, path, log_prob, entropy)``."""
    c = [t.contiguous() for t in (q, kv.tok_keys, kv.tok_values, *kv.keys, *kv.values)]
    gumbel = None if gumbel is None else gumbel.contiguous()
    actions = None if actions is None else actions.contiguous().long()
    return SearchReadout.apply(kv, gumbel, actions, *c)


def group_attention_backward(qkv: torch.Tensor, mask: torch.Tensor | None, scale: float,
                             g_out: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of :func:`group_attention` w.r.t. ``qkv [G, c, 3, H, dh]`` for ``g_out [G, c, H, dh]``
    (written into ``out`` when given)."""
    G, c, _, H, dh = qkv.shape
    qkv, g_out, m = qkv.contiguous(), g_out.contiguous(), _u8(mask)
    d = _out(out, qkv, G, c, 3, H, dh)
    _run(library().tca_group_attention_bwd, G, c, H, dh, scale, _ptr(qkv), _ptr(m), _ptr(g_out), _ptr(d))
    return d


class GroupAttention(torch.autograd.Function):
    """Differentiable :func:`group_attention` (C forward and backward): ``qkv [G, c, 3, H, dh]`` contiguous
    float32, ``mask [G, c]`` or None (not differentiable) -> ``[G, c, H, dh]``."""

    @staticmethod
    def forward(ctx, qkv, mask, scale):  # noqa: D102
        ctx.save_for_backward(qkv)
        ctx.mask, ctx.scale = mask, scale
        return group_attention(qkv, mask, scale)

    @staticmethod
    def backward(ctx, g_out):  # noqa: D102
        (qkv,) = ctx.saved_tensors
        return group_attention_backward(qkv, ctx.mask, ctx.scale, g_out), None, None


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, out: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x)`` for contiguous ``x [R, D]`` (no autograd), into ``out`` when given."""
    y = _out(out, x, *x.shape)
    _run(library().tca_norm_rows, x.shape[0], x.shape[1], _ptr(x), _ptr(norm.weight), _ptr(norm.bias), norm.eps,
         _ptr(y), None)
    return y


def residual_ln_mean(o: torch.Tensor, x: torch.Tensor, norm: torch.nn.LayerNorm, w: torch.Tensor | None,
                     c: int, out: torch.Tensor | None = None,
                     out_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In one pass over rows ``[G*c, D]``: ``o += x``; returns ``norm(o)`` and the per-group weighted sum of
    ``o`` (``w [G, c]`` masked-mean weights, None: the mean), into ``out`` / ``out_mean`` when given."""
    R, D = o.shape
    y, hm = _out(out, o, R, D), _out(out_mean, o, R // c, D)
    wc = None if w is None else w.contiguous()
    _run(library().tca_residual_norm_mean, R // c, c, D, _ptr(o), _ptr(x), _ptr(norm.weight), _ptr(norm.bias),
         norm.eps, _ptr(wc), _ptr(y), None, _ptr(hm))
    return y, hm


def relu_mean(r: torch.Tensor, w: torch.Tensor | None, c: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU in place on rows ``[G*c, F]`` and the per-group weighted sum (``w [G, c]``, None: the mean),
    written into ``out`` when given."""
    R, F_ = r.shape
    rm = _out(out, r, R // c, F_)
    wc = None if w is None else w.contiguous()
    _run(library().tca_relu_mean, R // c, c, F_, _ptr(r), _ptr(wc), _ptr(rm))
    return rm


def normalize(x: torch.Tensor, eps: float, xh: torch.Tensor, rstd: torch.Tensor | None = None) -> None:
    """Rows of ``x [R, D]`` normalised without affine into ``xh`` (and ``1/std`` into ``rstd [R]`` when given)."""
    x = x.contiguous()
    _run(library().tca_norm_rows, x.shape[0], x.shape[1], _ptr(x), None, None, eps, _ptr(xh), _ptr(rstd))


def residual_norm_mean(o: torch.Tensor, x: torch.Tensor, eps: float, w: torch.Tensor | None, c: int,
                       xh: torch.Tensor, rstd: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``o += x`` over rows ``[G*c, D]``, the rows normalised into ``xh`` (``rstd``), and the per-group
    weighted sum of ``o`` returned (``w [G, c]``, None: the mean; into ``out`` when given)."""
    R, D = o.shape
    hm = _out(out, o, R // c, D)
    wc = None if w is None else w.contiguous()
    _run(library().tca_residual_norm_mean, R // c, c, D, _ptr(o), _ptr(x.contiguous()), None, None, eps, _ptr(wc),
         _ptr(xh), _ptr(rstd), _ptr(hm))
    return hm


def norm_backward(dxh: torch.Tensor, xh: torch.Tensor, rstd: torch.Tensor, w_row: torch.Tensor,
                  dnode: torch.Tensor, grp: torch.Tensor) -> torch.Tensor:
    """Gradient through a normalisation (``dxh`` w.r.t. its output) plus ``w_row * dnode[grp]``: ``[R, D]``."""
    dxh = dxh.contiguous()
    dh = torch.empty_like(dxh)
    _run(library().tca_norm_backward, dxh.shape[0], dxh.shape[1], _ptr(dxh), _ptr(xh), _ptr(rstd), _ptr(w_row),
         _ptr(dnode.contiguous()), _ptr(grp), _ptr(dh))
    return dh


def expand_rows(src: torch.Tensor, grp: torch.Tensor, w_row: torch.Tensor,
                relu_out: torch.Tensor | None = None) -> torch.Tensor:
    """``w_row[r] * src[grp[r]]`` for every row r, zero where ``relu_out[r] <= 0`` (when given): ``[R, F]``."""
    src = src.contiguous()
    R, F_ = grp.shape[0], src.shape[1]
    out = src.new_empty(R, F_)
    _run(library().tca_expand_rows, R, F_, _ptr(src), _ptr(grp), _ptr(w_row), _ptr(relu_out), _ptr(out))
    return out
