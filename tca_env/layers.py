"""The building blocks of ReTreever, in the form of the paper's reference implementation.

Every layer here is written once and used by the encoder, the tree's aggregator and the read-outs:

* :class:`Attention`: multi-head attention with bias-free query / key / value projections and an output
  projection with bias; scores scaled by ``dh ** -0.5``; masked entries get the most negative finite
  float (a fully masked row stays finite: it becomes a uniform average that callers then drop); dropout
  on the attention weights in training.
* :class:`FeedForward`: ``Linear(D, 2F)`` -> GEGLU (``a * gelu(g)`` of the two halves) -> ``Linear(F, D)``
  -> dropout.
* :class:`EncoderLayer`: ``h = LN1(x); h = SelfAttn(h) + h; h = LN2(h); out = FF(h) + h``. The residual
  adds the *normalised* stream, not the layer's input (this is the reference's "norm first" layer; it is
  not ``torch.nn.TransformerEncoderLayer(norm_first=True)``, whose residual carries the raw input).
* :func:`embedder`: ``Linear(in, D), ELU, [Linear(D, D), ELU] x (depth - 2), Linear(D, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_fill_value(dtype: torch.dtype) -> float:
    """The score given to masked entries: the most negative finite float (``-inf`` turns a fully masked
    row into NaN)."""
    return -torch.finfo(dtype).max


class Attention(nn.Module):
    """Multi-head attention; :meth:`queries` and :meth:`keys_values` expose the projections so a tree's
    nodes are projected once and the search scores children with the same weights."""

    def __init__(self, d: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if d % nhead:
            raise ValueError(f"model width {d} is not divisible by {nhead} heads")
        self.nhead, self.dh = nhead, d // nhead
        self.dropout = dropout
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> ``[..., H, dh]``, pre-scaled by ``dh ** -0.5`` so scores are plain dot products."""
        return (self.q(x) * self.dh**-0.5).unflatten(-1, (self.nhead, self.dh))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[..., D]`` -> keys and values, ``[..., H, dh]`` each. Two products rather than one fused one: the
        tree's key and value tables are gathered from row by row and must be contiguous, and a fused
        product's halves would need a copy each (at 2^20 tokens, 1 GiB)."""
        shape = (self.nhead, self.dh)
        return self.k(x).unflatten(-1, shape), self.v(x).unflatten(-1, shape)

    def self_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (pre-scaled), keys and values of ``x [..., D]`` attending to itself, ``[..., H, dh]`` each:
        one matrix product for the three projections (the same weights as :meth:`queries` / :meth:`keys_values`)."""
        w = torch.cat([self.q.weight * self.dh**-0.5, self.k.weight, self.v.weight])
        qkv = F.linear(x, w).unflatten(-1, (3, self.nhead, self.dh))
        return qkv.select(-3, 0), qkv.select(-3, 1), qkv.select(-3, 2)

    @property
    def p_drop(self) -> float:
        """Dropout probability of the attention weights now: the configured one in training, else 0."""
        return self.dropout if self.training else 0.0

    #: key sets up to this size use the broadcast form below (tree children, leaf buckets); larger ones SDPA
    small_set = 8

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               dropout: float = 0.0) -> torch.Tensor:
        """``q [G, M, H, dh]`` (pre-scaled) over ``k, v [G, N, H, dh]``, ``mask [G, N]`` -> ``[G, M, H, dh]``.

        ``dropout``: probability of dropping each attention weight (pass :attr:`p_drop`).

        Two backends of the same math: for small key sets (a node's children: the aggregator runs over
        thousands of groups of b or P entries) a broadcast multiply-sum, 2-6x faster forward + backward on a
        CPU than fused SDPA, whose per-group overhead dominates there; otherwise fused SDPA.
        """
        if k.shape[1] <= Attention.small_set:
            s = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1)  # [G, M, N, H]
            if mask is not None:
                s = s.masked_fill(~mask[:, None, :, None], masked_fill_value(s.dtype))
            w = F.dropout(s.softmax(2), dropout) if dropout > 0 else s.softmax(2)
            return (w.unsqueeze(-1) * v.unsqueeze(1)).sum(2)  # [G, M, H, dh]
        bias = None
        if mask is not None:  # additive mask: finite, so a fully masked row averages instead of NaN
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~mask, masked_fill_value(q.dtype))[:, None, None, :]  # [G, 1, 1, N]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=bias, dropout_p=dropout, scale=1.0)
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [G, M, D]`` attends over ``context [G, N, D]`` (``mask [G, N]``: real entries) -> ``[G, M, D]``.

        ``context is x`` (self-attention) projects queries, keys and values in one product."""
        if context is x:
            q, k, v = self.self_qkv(x)
        else:
            q, (k, v) = self.queries(x), self.keys_values(context)
        return self.out(self.attend(q, k, v, mask, self.p_drop).flatten(-2))


class FeedForward(nn.Module):
    """``Linear(D, 2F)``, GEGLU, ``Linear(F, D)``, dropout."""

    def __init__(self, d: int, dim_ff: int, dropout: float = 0.0):
        super().__init__()
        self.inp = nn.Linear(d, 2 * dim_ff)
        self.outp = nn.Linear(dim_ff, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.inp(x).chunk(2, dim=-1)
        return self.drop(self.outp(a * F.gelu(g)))


class EncoderLayer(nn.Module):
    """``h = LN1(x); h = SelfAttn(h) + h; h = LN2(h); out = FF(h) + h`` (residuals on the normalised stream)."""

    def __init__(self, d: int, nhead: int, dim_ff: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, nhead, dropout)
        self.ff = FeedForward(d, dim_ff, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [G, c, D]``, ``mask [G, c]`` (real entries, or None) -> ``[G, c, D]``."""
        h = self.norm1(x)
        h = self.attn(h, h, mask) + h
        h = self.norm2(h)
        return self.ff(h) + h


def embedder(inp: int, d: int, depth: int) -> nn.Sequential:
    """``Linear(inp, d), ELU, [Linear(d, d), ELU] x (depth - 2), Linear(d, d)`` (``depth`` linear maps)."""
    if depth < 1:
        raise ValueError(f"embedder depth must be >= 1; got {depth}")
    if depth == 1:
        return nn.Sequential(nn.Linear(inp, d))
    layers: list[nn.Module] = [nn.Linear(inp, d), nn.ELU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(d, d), nn.ELU()]
    layers.append(nn.Linear(d, d))
    return nn.Sequential(*layers)


def position_mlp(d: int) -> nn.Sequential:
    """The MLP after the position encoding of sequential inputs: ``D -> 2D -> 2D -> D`` with ReLU."""
    return nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
