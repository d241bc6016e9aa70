"""Training-time bottom-up aggregation as one autograd node with a hand-written backward.

Why: with ``bptt=False`` (the paper's default) every level's aggregator input is detached, so the
levels' backward passes are independent, and the layer can be differentiated by hand more cheaply
than autograd does it:

* the forward runs level by level without a graph, with the elementwise passes in C
  (:mod:`tca_env.kernels`) and the layer norms' affine maps folded into the next matrix product
  (``LN(x) W^T + b = xhat (W diag g)^T + (W beta + b)``), storing only what the backward needs;
* the backward treats every child row of every level at once: one matrix product per weight, and
  none for the gradient of the first layer's input (the input is detached; the first norm's
  gradients come from the same product as the weight's), the children's self-attention in C;
* the masked mean is taken before the feed-forward's second linear map (exact, as at inference).

Results equal the autograd path up to float rounding (tests/test_kernels.py compares every level's
nodes and every parameter's gradient). :func:`tca_env.tree.build_tree` uses it under autograd when
``bptt=False``, the aggregator has no dropout, and the kernels are built for float32 CPU tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


def level_offsets(sizes: list[int]) -> list[int]:
    """Start of each block in a tensor holding blocks of these sizes one after the other."""
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


class FusedAggregation(torch.autograd.Function):
    """All nodes from the leaf tokens: ``all_nodes [sum_l B*b^l, D]`` (levels 0..k in order) and the
    node masks ``[sum_l B*b^l]`` (not differentiable).

    Inputs: ``agg`` (the :class:`~tca_env.tree.Aggregator`), ``tokens [B, P*b^k, D]`` (no gradient),
    ``token_mask [B*b^k, P]`` or None, ``pad`` (for levels 1..k: does the level have padded nodes),
    ``b``, ``k``, then the aggregator's parameters in :func:`aggregator_params` order.
    """

    @staticmethod
    def forward(ctx, agg, tokens, token_mask, pad, b, k, *params):  # noqa: D102
        g1, be1, wqkv, bqkv, wo, bo, g2, be2, w1, b1, w2, b2 = params
        B, S, D = tokens.shape
        P = S // b**k
        H, dh = agg.nhead, agg.dh
        groups = [B * b**lvl for lvl in range(k + 1)]  # nodes per level 0..k
        goff = level_offsets(groups)
        cs = [b] * k + [P]  # children per node at levels 0..k
        rows = [groups[lvl] * cs[lvl] for lvl in range(k + 1)]
        roff = level_offsets(rows)
        R, G, Fd = sum(rows), sum(groups), w1.shape[0]
        new = tokens.new_empty
        XH1, XH2, ATT = new(R, D), new(R, D), new(R, D)
        QKV, RL = new(R, 3 * D), new(R, Fd)
        RS2 = new(R)  # the first norm's 1/std is not needed: its input is detached
        RM = new(G, Fd)
        all_nodes = new(G, D)
        node_mask = torch.ones(G, dtype=torch.bool, device=tokens.device)
        w_row = new(R)  # masked-mean weight of each child row
        wsum = new(G, 1)  # sum of a node's weights: 1, or 0 for a fully padded node
        # layer norms folded into the following products
        wqkv_f, bqkv_f = wqkv * g1, torch.addmv(bqkv, wqkv, be1)
        w1_f, b1_f = w1 * g2, torch.addmv(b1, w1, be2)
        masks = [None] * (k + 1)
        x = tokens.reshape(groups[k] * P, D)
        m = token_mask
        for lvl in range(k, -1, -1):
            r0, r1, g0, g1_ = roff[lvl], roff[lvl] + rows[lvl], goff[lvl], goff[lvl] + groups[lvl]
            Gl, c = groups[lvl], cs[lvl]
            masks[lvl] = m
            if m is None:
                w = None
                w_row[r0:r1] = 1.0 / c
                wsum[g0:g1_] = 1.0
            else:
                w = m.to(tokens.dtype)
                w = w / w.sum(1, keepdim=True).clamp_min(1.0)
                node_mask[g0:g1_] = m.any(1)
                w_row[r0:r1] = w.reshape(-1)
                wsum[g0:g1_] = w.sum(1, keepdim=True)
            kernels.normalize(x, agg.norm1.eps, XH1[r0:r1])
            torch.addmm(bqkv_f, XH1[r0:r1], wqkv_f.t(), out=QKV[r0:r1])
            kernels.group_attention(QKV[r0:r1].view(Gl, c, 3, H, dh), m, dh**-0.5, out=ATT[r0:r1])
            h = F.linear(ATT[r0:r1], wo, bo)
            node = all_nodes[g0:g1_]
            kernels.residual_norm_mean(h, x, agg.norm2.eps, w, c, XH2[r0:r1], RS2[r0:r1], out=node)  # node = mean h
            torch.addmm(b1_f, XH2[r0:r1], w1_f.t(), out=RL[r0:r1])
            rm = kernels.relu_mean(RL[r0:r1], w, c, out=RM[g0:g1_])
            node.addmm_(rm, w2.t())
            node.addmm_(wsum[g0:g1_], b2.unsqueeze(0))  # + b2 * wsum (0 for a fully padded node)
            if lvl > 0:
                x = node
                m = node_mask[g0:g1_].view(groups[lvl - 1], b) if pad[lvl - 1] else None
        grp = torch.cat([torch.arange(goff[lvl], goff[lvl] + groups[lvl], device=tokens.device)
                         .repeat_interleave(cs[lvl]) for lvl in range(k + 1)])  # node of each child row
        ctx.save_for_backward(XH1, XH2, ATT, QKV, RL, RS2, RM, w_row, wsum, grp, *params)
        ctx.meta = (masks, roff, rows, groups, cs, H, dh)
        ctx.mark_non_differentiable(node_mask)
        return all_nodes, node_mask

    @staticmethod
    def backward(ctx, d_nodes, _d_mask):  # noqa: D102
        XH1, XH2, ATT, QKV, RL, RS2, RM, w_row, wsum, grp, *params = ctx.saved_tensors
        g1, be1, wqkv, bqkv, wo, bo, g2, be2, w1, b1, w2, b2 = params
        masks, roff, rows, groups, cs, H, dh = ctx.meta
        d_nodes = d_nodes.contiguous()
        # node = sum_i w_i h_i + W2 (sum_i w_i r_i) + b2 * wsum
        dw2, db2 = d_nodes.t() @ RM, (d_nodes * wsum).sum(0)
        dz1 = kernels.expand_rows(d_nodes @ w2, grp, w_row, RL)  # [R, F]: to the child rows, through the ReLU
        # r = relu(xh2 (W1 g2)^T + W1 be2 + b1)
        m2, s1 = dz1.t() @ XH2, dz1.sum(0)  # [F, D], [F]
        dw1 = m2 * g2 + torch.outer(s1, be2)
        dg2, dbe2, db1 = (w1 * m2).sum(0), s1 @ w1, s1
        dxh2 = dz1 @ (w1 * g2)  # [R, D]
        d_h = kernels.norm_backward(dxh2, XH2, RS2, w_row, d_nodes, grp)  # + the masked mean's direct path
        dwo, dbo = d_h.t() @ ATT, d_h.sum(0)
        datt = d_h @ wo
        dqkv = torch.empty_like(QKV)
        for lvl in range(len(rows)):
            r0, r1 = roff[lvl], roff[lvl] + rows[lvl]
            Gl, c = groups[lvl], cs[lvl]
            kernels.group_attention_backward(QKV[r0:r1].view(Gl, c, 3, H, dh), masks[lvl], dh**-0.5,
                                             datt[r0:r1].view(Gl, c, H, dh), out=dqkv[r0:r1])
        # qkv = xh1 (Wqkv g1)^T + Wqkv be1 + bqkv; the input is detached, so no product for its gradient
        m1, sq = dqkv.t() @ XH1, dqkv.sum(0)  # [3D, D], [3D]
        dwqkv = m1 * g1 + torch.outer(sq, be1)
        dg1, dbe1, dbqkv = (wqkv * m1).sum(0), sq @ wqkv, sq
        grads = (dg1, dbe1, dwqkv, dbqkv, dwo, dbo, dg2, dbe2, dw1, db1, dw2, db2)
        return (None, None, None, None, None, None, *grads)


def aggregator_params(agg) -> list[torch.Tensor]:
    """The aggregator's parameters in the order :class:`FusedAggregation` takes them."""
    return [agg.norm1.weight, agg.norm1.bias, agg.qkv.weight, agg.qkv.bias, agg.out.weight, agg.out.bias,
            agg.norm2.weight, agg.norm2.bias, agg.ff[0].weight, agg.ff[0].bias, agg.ff[3].weight, agg.ff[3].bias]


def usable(agg, tokens: torch.Tensor) -> bool:
    """No dropout in the aggregator, float32 CPU tensors, kernels built."""
    return agg.drop.p == 0 and tokens.device.type == "cpu" and tokens.dtype == torch.float32 \
        and kernels.library() is not None
