"""The tree of Tree Cross Attention: ordering, padding, level tensors and bottom-up aggregation.

A tree over N tokens with branch factor b has k = max{k : b^k <= N - 1} levels of branching
(k = 0 when N <= 2) and b^k leaf buckets of P = ceil(N / b^k) slots. It is not a pointer structure:
level l (1 <= l <= k) is a tensor of b^l node embeddings in left-to-right order, the children of node
i at level l are nodes i*b .. i*b + b-1 at level l+1, and leaf bucket i (level k) holds token slots
i*P .. i*P + P-1 of the padded token tensor ``[B, b^k * P, D]``.

Padding. The paper pads to P*b^k slots; we spread the real tokens over the buckets recursively
(the children of a node with n tokens get floor(n/b) or ceil(n/b) of them, the extra ones going to
the leftmost children), so every subtree is as balanced as it can be and a k-d ordering splits
each node at its median. Which slots are real depends only on N, so it is shared by the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_tree
from .ops import softmax_small
from .tasks.base import ORDERINGS


def tree_depth(n: int, b: int) -> int:
    """k = floor(log_b(n - 1)) computed exactly in integers (0 for n <= 2)."""
    if n < 1:
        raise ValueError(f"a tree needs at least one token; got N = {n}")
    if b < 2:
        raise ValueError(f"branch factor must be >= 2; got b = {b}")
    k = 0
    while b ** (k + 1) <= n - 1:
        k += 1
    return k


def retrieved_size(n: int, b: int) -> int:
    """|S| = (b - 1) * k + P, the number of slots a query attends to (padded slots included)."""
    k = tree_depth(n, b)
    return (b - 1) * k + -(-n // b**k)


@lru_cache(maxsize=256)
def _layout(n: int, b: int) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Token counts per node at each level 0..k, and the padded slot of each ordered token."""
    k = tree_depth(n, b)
    P = -(-n // b**k)
    counts: list[tuple[int, ...]] = [(n,)]
    for _ in range(k):
        counts.append(tuple(c // b + (1 if j < c % b else 0) for c in counts[-1] for j in range(b)))
    slots = tuple(leaf * P + j for leaf, c in enumerate(counts[-1]) for j in range(c))
    return tuple(counts), slots


@dataclass(frozen=True)
class TreeShape:
    """Sizes of the tree over ``n`` tokens with branch factor ``b`` (independent of the batch)."""

    n: int
    b: int

    @property
    def k(self) -> int:
        return tree_depth(self.n, self.b)

    @property
    def P(self) -> int:  # noqa: N802
        return -(-self.n // self.b**self.k)

    @property
    def num_slots(self) -> int:
        return self.P * self.b**self.k

    @property
    def retrieved_size(self) -> int:
        return (self.b - 1) * self.k + self.P

    def counts(self, level: int) -> torch.Tensor:
        """Real tokens under each node of ``level`` (0 = root, k = leaf buckets): ``[b^level]``."""
        return torch.tensor(_layout(self.n, self.b)[0][level])

    def padded(self, level: int) -> bool:
        """Whether ``level`` (0..k nodes, k+1 the token slots) has padded entries (a function of N alone)."""
        if level > self.k:
            return self.n != self.num_slots
        return 0 in _layout(self.n, self.b)[0][level]

    def slot_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Padded slot of the t-th ordered token: ``[N]`` long."""
        return torch.tensor(_layout(self.n, self.b)[1], device=device)

    def slot_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Which of the ``P * b^k`` slots hold a real token: ``[P * b^k]`` bool."""
        mask = torch.zeros(self.num_slots, dtype=torch.bool, device=device)
        mask[self.slot_index(device)] = True
        return mask


# --------------------------------------------------------------------------------------------- ordering

def _projection_vector(dim: int, device: torch.device) -> torch.Tensor:
    # Fixed across runs and processes: the projection is part of the tree's definition.
    g = torch.Generator().manual_seed(1234 + dim)
    w = torch.randn(dim, generator=g)
    return (w / w.norm()).to(device)


def order_tokens(coords: torch.Tensor | None, n: int, b: int, ordering: str, coord: int = 0,
                 batch_size: int | None = None) -> torch.Tensor:
    """Permutation ``[B, N]`` listing the tokens in the order the tree's slots take them.

    Args:
        coords: ``[B, N, dx]`` coordinates (``None`` allowed for ``"natural"``).
        ordering: ``"natural"`` (as given), ``"coord"`` (sort by coordinate ``coord``), ``"projection"``
            (sort by a fixed random projection), ``"kd"`` (recursive median splits cycling through the
            coordinates: the tokens of each node are sorted along coordinate ``level % dx`` and dealt to
            its children in order, so every node is one cell of the k-d split).
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"unknown ordering {ordering!r}; choose one of {ORDERINGS}")
    if ordering == "natural":
        B = coords.shape[0] if coords is not None else batch_size
        device = coords.device if coords is not None else "cpu"
        return torch.arange(n, device=device).expand(B, n)
    if coords is None or coords.dim() != 3 or coords.shape[1] != n:
        raise ValueError(f"ordering {ordering!r} needs coordinates [B, {n}, dx]")
    dx = coords.shape[-1]
    if ordering == "coord":
        if not 0 <= coord < dx:
            raise ValueError(f"sort coordinate {coord} out of range for dx = {dx}")
        return torch.argsort(coords[..., coord], dim=1, stable=True)
    if ordering == "projection":
        return torch.argsort(coords @ _projection_vector(dx, coords.device), dim=1, stable=True)
    # k-d: one pass per level; tokens of a node stay contiguous, so a stable sort by value followed
    # by a stable sort by node id sorts inside every node at once.
    shape = TreeShape(n, b)
    perm = torch.arange(n, device=coords.device).expand(coords.shape[0], n)
    for level in range(shape.k):
        node_of = torch.repeat_interleave(torch.arange(b**level, device=coords.device),
                                          shape.counts(level).to(coords.device))  # [N]
        vals = coords[..., level % dx].gather(1, perm)  # [B, N]
        by_val = torch.argsort(vals, dim=1, stable=True)
        by_node = torch.argsort(node_of[by_val], dim=1, stable=True)
        perm = perm.gather(1, by_val.gather(1, by_node))
    return perm


# ------------------------------------------------------------------------------------------- aggregation

class Aggregator(nn.Module):
    """Agg(children) = masked mean of one pre-norm Transformer layer applied over the children.

    The layer is written out rather than taken from ``nn.TransformerEncoderLayer``: its sets hold only
    b or P elements, and broadcasting over such tiny sets is several times faster on a CPU than the
    batched matrix products of a generic layer. Dropout is off by default here (``dropout`` applies to
    every one of the ~2N nodes per tree, and CPU dropout costs more than the layer itself).
    """

    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float = 0.0):
        super().__init__()
        self.nhead, self.dh = nhead, d_model // nhead
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_ff), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(dim_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                workspace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x ``[G, c, D]`` groups of c children, mask ``[G, c]`` -> node ``[G, D]``, node mask ``[G]``.

        ``mask=None`` means every child is real (node mask None). Without autograd (and without active
        dropout) the layer runs :meth:`_forward_inference` on cache-sized chunks of groups; ``workspace``
        (a dict, e.g. one per tree) lets successive calls reuse its buffers.
        """
        if not (torch.is_grad_enabled() and (x.requires_grad or self.qkv.weight.requires_grad)) \
                and (not self.training or self.drop.p == 0):
            return self._forward_inference(x, mask, workspace)
        from . import kernels

        if self.drop.p == 0 and kernels.usable(x.detach()):
            return self._forward_fused(x, mask)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        c = x.shape[1]
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.nhead, self.dh)).unbind(-3)  # [G, c, H, dh]
        # One key at a time (c <= b + 1 is small): temporaries stay at the size of q instead of c times it.
        scores = torch.stack([(q * k[:, j:j + 1]).sum(-1) for j in range(c)], dim=2) * self.dh**-0.5  # [G, c, c, H]
        # A finite large negative (not -inf) keeps fully padded groups finite; the masked mean drops them.
        attn = softmax_small(scores.masked_fill(~mask[:, None, :, None], -torch.finfo(x.dtype).max), dim=2)
        out = torch.zeros_like(q)  # [G, c, H, dh]
        for j in range(c):
            out.addcmul_(attn[:, :, j:j + 1].transpose(2, 3), v[:, j:j + 1])  # in place: autograd-safe
        del q, k, v
        h = self.out(out.flatten(-2)).add_(x) if self.drop.p == 0 else x + self.drop(self.out(out.flatten(-2)))
        del out
        f = self.drop(self.ff(self.norm2(h)))
        # h feeds norm2's backward, so it may only be overwritten when no graph is recorded.
        inplace = not torch.is_grad_enabled()
        h = h.add_(f) if inplace else h + f  # [G, c, D]
        del f
        w = mask.to(x.dtype).unsqueeze(-1)  # [G, c, 1]
        node = (h.mul_(w) if inplace else h * w).sum(1) / w.sum(1).clamp_min(1.0)  # [G, D]
        return node, mask.any(1)

    def _forward_fused(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The autograd path with the children's self-attention in C (forward and backward) and the
        masked mean taken before the feed-forward's second linear map (exact: see _forward_inference)."""
        from . import kernels

        G, c, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(G, c, 3, self.nhead, self.dh)
        att = kernels.GroupAttention.apply(qkv, mask, self.dh**-0.5)
        h = self.out(att.view(G, c, D)) + x  # [G, c, D]
        r = self.ff[1](self.ff[0](self.norm2(h)))  # [G, c, F]
        W2, b2 = self.ff[3].weight, self.ff[3].bias
        if mask is None:
            return h.mean(1) + F.linear(r.mean(1), W2, b2), None
        w = mask.to(x.dtype)
        w = (w / w.sum(1, keepdim=True).clamp_min(1.0)).unsqueeze(-1)  # [G, c, 1] masked mean weights
        node = (h * w).sum(1) + (r * w).sum(1) @ W2.t() + w.sum(1) * b2  # a fully padded group gives 0
        return node, mask.any(1)

    #: groups per chunk of the inference path: its temporaries (about 10 D-wide rows per child) stay in
    #: the CPU's cache instead of streaming tens of MiB through memory at every level.
    chunk_groups = 1024

    @torch.no_grad()
    def _forward_inference(self, x: torch.Tensor, mask: torch.Tensor | None,
                           workspace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same layer and masked mean without autograd, restructured for speed and memory.

        Exact rewrites (equal up to float rounding; tests/test_kernels.py checks): the masked mean is
        taken before the feed-forward's second linear map (mean_i (W r_i + c) = W mean_i r_i + c,
        which halves that product for b = 2); groups are processed in chunks of ``chunk_groups``; and
        with the kernels (tca_env.kernels) everything but the four matrix products runs as C passes,
        writing into buffers reused by every chunk (and, through ``workspace``, every level): fresh
        multi-MiB temporaries per chunk cost more in page faults than the passes themselves.
        """
        from . import kernels

        G, c, D = x.shape
        node = x.new_empty(G, D)
        fused = kernels.usable(x)  # the elementwise passes in C, the four matrix products in PyTorch
        x = x.contiguous()
        w_all = None
        if mask is not None:
            w_all = mask.to(x.dtype)
            w_all = w_all / w_all.sum(1, keepdim=True).clamp_min(1.0)  # [G, c]: masked mean weights
        W2, b2 = self.ff[3].weight, self.ff[3].bias
        for g0 in range(0, G, self.chunk_groups):
            g1 = min(G, g0 + self.chunk_groups)
            xc = x[g0:g1]
            m = None if mask is None else mask[g0:g1]
            if fused:
                rows = xc.reshape(-1, D)
                R, g = rows.shape[0], g1 - g0
                buf = self._buffers_for(workspace, R, g, x)
                y1 = kernels.layer_norm(rows, self.norm1, out=buf["y"][:R])
                qkv = torch.addmm(self.qkv.bias, y1, self.qkv.weight.t(), out=buf["qkv"][:R])
                att = kernels.group_attention(qkv.view(g, c, 3, self.nhead, self.dh), m, self.dh**-0.5,
                                              out=buf["att"][:R])
                h = torch.addmm(self.out.bias, att.view(R, D), self.out.weight.t(), out=buf["h"][:R])
                w = None if w_all is None else w_all[g0:g1]
                out = node[g0:g1]
                y2, _ = kernels.residual_ln_mean(h, rows, self.norm2, w, c, out=buf["y"][:R], out_mean=out)
                r = torch.addmm(self.ff[0].bias, y2, self.ff[0].weight.t(), out=buf["r"][:R])
                rm = kernels.relu_mean(r, w, c, out=buf["rm"][:g])
                out.addmm_(rm, W2.t())  # node = mean h + W2 mean r (+ b2 below)
                out += b2 if w is None else w.sum(1, keepdim=True) * b2
                continue
            qkv = self.qkv(self.norm1(xc))  # [g, c, 3D]
            att = self._attend(qkv, m)
            del qkv
            h = self.out(att.view(g1 - g0, c, D)).add_(xc)  # [g, c, D]
            del att
            r = self.ff[1](self.ff[0](self.norm2(h)))  # [g, c, F] (ReLU in place)
            if mask is None:
                hm, rm, wsum = h.mean(1), r.mean(1), None
            else:
                w = w_all[g0:g1].unsqueeze(-1)  # [g, c, 1]
                hm, rm, wsum = h.mul_(w).sum(1), r.mul_(w).sum(1), w.sum(1)  # [g, D], [g, F], [g, 1]
            del h, r
            out = torch.addmm(hm, rm, W2.t(), out=node[g0:g1])
            out += b2 if wsum is None else wsum * b2  # a fully padded group stays exactly 0
        return node, None if mask is None else mask.any(1)

    def _buffers_for(self, workspace: dict | None, rows: int, groups: int, like: torch.Tensor) -> dict:
        """Buffers for one chunk of the C inference path, taken from ``workspace`` when they are big enough."""
        ws = {} if workspace is None else workspace
        D, Fd = like.shape[-1], self.ff[0].out_features
        if ws.get("rows", 0) < rows or ws.get("groups", 0) < groups or ws["y"].dtype != like.dtype \
                or ws["y"].device != like.device:
            rows, groups = max(rows, ws.get("rows", 0)), max(groups, ws.get("groups", 0))
            ws.update(rows=rows, groups=groups, y=like.new_empty(rows, D), qkv=like.new_empty(rows, 3 * D),
                      att=like.new_empty(rows, D), h=like.new_empty(rows, D), r=like.new_empty(rows, Fd),
                      rm=like.new_empty(groups, Fd))
        return ws

    def _attend(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """PyTorch version of kernels.group_attention: ``[g, c, 3D]`` -> ``[g, c, H, dh]``."""
        c = qkv.shape[1]
        q, k, v = qkv.unflatten(-1, (3, self.nhead, self.dh)).unbind(-3)  # [g, c, H, dh]
        scores = torch.stack([(q * k[:, j:j + 1]).sum(-1) for j in range(c)], dim=2) * self.dh**-0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :, None], -torch.finfo(qkv.dtype).max)
        attn = softmax_small(scores, dim=2)  # [g, c, c, H]
        out = torch.zeros_like(q)
        for j in range(c):
            out.addcmul_(attn[:, :, j:j + 1].transpose(2, 3), v[:, j:j + 1])
        return out


@dataclass
class Tree:
    """A batch of trees.

    Attributes:
        shape: sizes (n, b, k, P).
        tokens: ``[B, P*b^k, D]`` leaf token embeddings in slot order (padded slots are zero).
        token_mask: ``[B, P*b^k]`` which slots are real.
        nodes: ``nodes[l]`` is ``[B, b^l, D]`` for l = 0..k (``nodes[0]`` is the root).
        node_mask: ``node_mask[l]`` is ``[B, b^l]``.
        perm: ``[B, N]`` the ordering: slot ``slot_index[t]`` holds context token ``perm[:, t]``.
    """

    shape: TreeShape
    tokens: torch.Tensor
    token_mask: torch.Tensor
    nodes: list[torch.Tensor]
    node_mask: list[torch.Tensor]
    perm: torch.Tensor
    all_nodes: torch.Tensor | None = None
    """When set (training), ``nodes`` are views of this ``[sum_l B*b^l, D]`` tensor, levels 0..k in order."""

    @property
    def token_index(self) -> torch.Tensor:
        """``[B, P*b^k]`` the context index held by each slot (-1 for padding)."""
        B = self.perm.shape[0]
        out = torch.full((B, self.shape.num_slots), -1, dtype=torch.long, device=self.perm.device)
        out[:, self.shape.slot_index(self.perm.device)] = self.perm
        return out


def build_tree(enc: torch.Tensor, b: int, aggregator: Aggregator, ordering: str = "natural",
               coords: torch.Tensor | None = None, coord: int = 0, bptt: bool = False) -> Tree:
    """Order, pad and aggregate ``enc [B, N, D]`` into a :class:`Tree`.

    With ``bptt=False`` (the paper's default) the aggregator's input is detached at every level, so
    the encoder learns only through the read-out and the tree through the aggregator's own weights.
    """
    if enc.dim() != 3:
        raise ValueError(f"context encodings must be [B, N, D]; got shape {tuple(enc.shape)}")
    B, N, D = enc.shape
    if B == 0:
        raise ValueError("empty batch: B = 0")
    shape = TreeShape(N, b)
    perm = order_tokens(coords, N, b, ordering, coord, batch_size=B)  # [B, N]
    ordered = enc if ordering == "natural" else enc.gather(1, perm.unsqueeze(-1).expand(B, N, D))
    if N == shape.num_slots:  # no padding: the slots are the ordered tokens (no copy)
        tokens = ordered
    else:
        tokens = enc.new_zeros(B, shape.num_slots, D)
        tokens[:, shape.slot_index(enc.device)] = ordered  # [B, P*b^k, D]
    token_mask = shape.slot_mask(enc.device).expand(B, -1)  # [B, P*b^k]

    k, P = shape.k, shape.P
    if not bptt and torch.is_grad_enabled() and aggregator.qkv.weight.requires_grad \
            and fused_tree.usable(aggregator, tokens):
        # Training with detached levels: one autograd node for the whole aggregation (fused_tree.py).
        tmask = None if N == shape.num_slots else token_mask.reshape(B * b**k, P)
        pad = [shape.padded(lvl) for lvl in range(1, k + 1)]
        all_nodes, all_mask = fused_tree.FusedAggregation.apply(
            aggregator, tokens.detach(), tmask, pad, b, k, *fused_tree.aggregator_params(aggregator))
        off = fused_tree.level_offsets([B * b**lvl for lvl in range(k + 1)])
        nodes = [all_nodes[off[lvl]:off[lvl] + B * b**lvl].view(B, b**lvl, D) for lvl in range(k + 1)]
        masks = [all_mask[off[lvl]:off[lvl] + B * b**lvl].view(B, b**lvl) for lvl in range(k + 1)]
        return Tree(shape, tokens, token_mask, nodes, masks, perm, all_nodes)
    # Masks are handed to the aggregator only where a level has padding (it depends on N alone).
    x = tokens.reshape(B * b**k, P, D)
    m = None if N == shape.num_slots else token_mask.reshape(B * b**k, P)
    nodes: list[torch.Tensor] = [enc.new_empty(0)] * (k + 1)
    masks: list[torch.Tensor] = [token_mask.new_empty(0)] * (k + 1)
    workspace: dict = {}  # buffers of the no-grad aggregator, shared by the levels
    for level in range(k, -1, -1):
        node, nm = aggregator(x if bptt else x.detach(), m, workspace)  # [B*b^level, D]
        if nm is None:
            nm = torch.ones(B * b**level, dtype=torch.bool, device=enc.device)
        nodes[level], masks[level] = node.reshape(B, b**level, D), nm.reshape(B, b**level)
        if level > 0:
            x = node.reshape(B * b ** (level - 1), b, D)
            m = nm.reshape(B * b ** (level - 1), b) if shape.padded(level) else None
    return Tree(shape, tokens, token_mask, nodes, masks, perm)
