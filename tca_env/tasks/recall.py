"""Associative recall: the long-context probe (find the value stored under a key among N pairs).

A context set is N (key, value) pairs: keys drawn uniformly from the unit cube ``[0, 1)^key_dim``
(``key_dim`` = 4 by default), values uniform over ``num_classes`` classes (one-hot in ``yc``). Each of the
M queries is one of the context's keys (drawn without replacement while M <= N); its answer is that
key's value. Keys are distinct: float32 draws from a 4-d cube collide with probability below
N^2 / 2^97 (the sampler checks it anyway, at the cost of one sort). Trees use the k-d ordering on the
keys, so every node is a box of key space and the search has a right answer at every level: the child
whose box holds the query (:meth:`RecallTask.target_tokens`).

``min_context_len`` makes N vary: each batch draws N log-uniformly in ``[min_context_len, context_len]``
(one N per batch, as the GP task does); the ``cpu`` preset trains so at N <= 1,024, for evaluation at up to
N = 2^20 (``benchmarks/scale.py``).

``min_key_scale`` (training sets only) zooms: each training set's keys fill a random box of side s, drawn
log-uniformly in ``[min_key_scale, 1]`` and placed uniformly in the unit cube, so training at small N also
sees the key spacings that only far larger contexts have. Why: below the top levels, a context of 2^20 keys
is a tree of small contexts whose keys fill small boxes (the subtrees of 1,024 keys have side
2^-2.5 ~ 0.18), and a model trained on the unit cube at N <= 4,096 routes such a box badly (75.5% accuracy
on 1,024 keys in the unit cube, 27.0% on the same keys shrunk into a box of side 0.25: ``search_report.py
--key-box``). Evaluation splits (``split != "train"``) always draw from the unit cube.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Batch, Task


class RecallTask(Task):
    name = "recall"
    head = "class"
    x_dim = 4
    y_dim = 10
    out_dim = 10
    ordering = "kd"
    reward = "acc"
    sequential = False
    # No context encoder (a quadratic one cannot run at N = 2^20), and Fourier features of the keys.
    model_defaults = {"encoder": "constant", "fourier_octaves": 8}
    # Options a trained predictor may be run with at other values (the training-only distribution options
    # min_context_len and min_key_scale are dropped when sizes are given: the env then serves exactly N).
    size_options = ("context_len", "min_context_len", "num_queries", "min_key_scale")

    def __init__(self, context_len: int = 1024, num_queries: int = 64, key_dim: int = 4, num_classes: int = 10,
                 min_context_len: int | None = None, min_key_scale: float | None = None):
        if context_len < 2:
            raise ValueError(f"recall task: context_len must be >= 2; got {context_len}")
        if min_context_len is not None and not 2 <= min_context_len <= context_len:
            raise ValueError(f"recall task: min_context_len must lie in [2, context_len = {context_len}]; "
                             f"got {min_context_len}")
        if min_key_scale is not None and not 0 < min_key_scale <= 1:
            raise ValueError(f"recall task: min_key_scale must lie in (0, 1]; got {min_key_scale}")
        if num_queries < 1:
            raise ValueError(f"recall task: num_queries must be >= 1; got {num_queries}")
        if key_dim < 1:
            raise ValueError(f"recall task: key_dim must be >= 1; got {key_dim}")
        if num_classes < 2:
            raise ValueError(f"recall task: num_classes must be >= 2; got {num_classes}")
        self.context_len, self.min_context_len = context_len, min_context_len
        self.num_queries = num_queries
        self.min_key_scale = min_key_scale
        # Instance attributes shadow the class defaults: the model is built from these.
        self.x_dim, self.y_dim, self.out_dim = key_dim, num_classes, num_classes

    @property
    def max_context(self) -> int:
        return self.context_len

    def draw_n(self, generator: torch.Generator) -> int:
        """This batch's N: ``context_len``, or log-uniform in ``[min_context_len, context_len]``."""
        if self.min_context_len is None or self.min_context_len == self.context_len:
            return self.context_len
        lo, hi = math.log(self.min_context_len), math.log(self.context_len + 1)
        u = float(torch.rand((), generator=generator))
        return min(self.context_len, int(math.exp(lo + u * (hi - lo))))

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu",
               split: str = "train") -> Batch:
        if batch_size <= 0:
            raise ValueError(f"recall task: batch_size must be positive; got {batch_size}")
        n, m = self.draw_n(generator), self.num_queries
        zoom = None
        if split == "train" and self.min_key_scale is not None and self.min_key_scale < 1:
            side = self.min_key_scale ** torch.rand(batch_size, 1, 1, generator=generator)  # log-uniform in [min, 1]
            zoom = (torch.rand(batch_size, 1, self.x_dim, generator=generator) * (1 - side), side)
        keys = self._keys(torch.rand(batch_size, n, self.x_dim, generator=generator), zoom)  # [B, N, d]
        while True:  # distinct keys (a repeat is astronomically rare; redraw the set if one occurs)
            dup = _repeated_rows(keys)
            if not bool(dup.any()):
                break
            redraw = torch.rand(int(dup.sum()), n, self.x_dim, generator=generator)
            keys[dup] = self._keys(redraw, None if zoom is None else (zoom[0][dup], zoom[1][dup]))
        values = torch.randint(0, self.out_dim, (batch_size, n), generator=generator)  # [B, N]
        if m <= n:  # distinct queries: the first M of a random permutation per set
            target = torch.rand(batch_size, n, generator=generator).argsort(1)[:, :m]
        else:
            target = torch.randint(0, n, (batch_size, m), generator=generator)
        xt = keys.gather(1, target.unsqueeze(-1).expand(-1, -1, self.x_dim))
        yt = values.gather(1, target)
        # Which context token each query needs is not stored in the batch: it is found again by exact
        # key match (target_tokens), so a batch built by hand works too.
        return Batch(xc=keys, yc=F.one_hot(values, self.out_dim).float(), xt=xt, yt=yt).to(device)

    @staticmethod
    def _keys(unit: torch.Tensor, zoom: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Keys from uniform draws ``unit [B, N, d]``: the unit cube, or each set's box ``(corner, side)``."""
        return unit if zoom is None else zoom[0] + zoom[1] * unit

    def target_tokens(self, batch: Batch) -> torch.Tensor:
        """The context token holding each query's key: ``[B, M]`` (found by sorting, O((N + M) log N))."""
        return match_keys(batch.xc, batch.xt)


def _repeated_rows(keys: torch.Tensor) -> torch.Tensor:
    """``[B]`` whether set b has two equal keys (rows sorted lexicographically, neighbours compared)."""
    order = _lex_order(keys)
    s = keys.gather(1, order.unsqueeze(-1).expand_as(keys))
    return (s[:, 1:] == s[:, :-1]).all(-1).any(-1)


def _lex_order(keys: torch.Tensor) -> torch.Tensor:
    """Permutation ``[B, N]`` sorting the rows of ``keys [B, N, d]`` lexicographically (stable sorts, last
    coordinate first)."""
    order = torch.arange(keys.shape[1], device=keys.device).expand(keys.shape[0], -1)
    for c in range(keys.shape[-1] - 1, -1, -1):
        by = keys[..., c].gather(1, order).argsort(dim=1, stable=True)
        order = order.gather(1, by)
    return order


def match_keys(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Index ``[B, M]`` of the row of ``keys [B, N, d]`` equal to each row of ``queries [B, M, d]``.

    Raises ``ValueError`` if a query matches no key.
    """
    B, N, d = keys.shape
    allk = torch.cat([keys, queries], 1)  # keys first: after a stable sort a key precedes its equal queries
    order = _lex_order(allk)  # [B, N+M]
    s = allk.gather(1, order.unsqueeze(-1).expand_as(allk))
    is_key = order < N
    # For every sorted position, the index of the last key at or before it.
    pos = torch.arange(order.shape[1], device=keys.device).expand(B, -1)
    last_key = torch.where(is_key, pos, torch.zeros_like(pos)).cummax(1).values
    key_row = s.gather(1, last_key.unsqueeze(-1).expand(-1, -1, d))
    ok = (key_row == s).all(-1) & is_key.gather(1, last_key)
    found = order.gather(1, last_key)  # [B, N+M] key index per sorted position
    out = torch.empty(B, queries.shape[1], dtype=torch.long, device=keys.device)
    qmask = ~is_key
    qidx = order[qmask].view(B, -1) - N
    if not bool(ok[qmask].all()):
        raise ValueError("recall: a query key matches no context key")
    out.scatter_(1, qidx, found[qmask].view(B, -1))
    return out
