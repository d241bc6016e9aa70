"""The reference's layers against written-out references (float64, values to 1e-6).

Each reference below is computed from the module's weights with plain tensor arithmetic: its own layer
norm, GELU from the error function, per-head softmax loops. None of them calls the package's layers.
"""

from __future__ import annotations

import math

import pytest
import torch

from tca_env import search as S
from tca_env.layers import Attention, EncoderLayer, FeedForward, embedder
from tca_env.model import Head, ModelConfig, ReadOut, ReTreever
from tca_env.tasks import Batch
from tca_env.tasks.base import summarize_metric

TOL = dict(rtol=1e-6, atol=1e-6)


def ln(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ff_ref(mod: FeedForward, x):
    u = x @ mod.inp.weight.T + mod.inp.bias
    F = u.shape[-1] // 2
    return (u[..., :F] * gelu(u[..., F:])) @ mod.outp.weight.T + mod.outp.bias


def attn_ref(mod: Attention, x, ctx, mask=None):
    """Multi-head attention, one head and one query at a time; bias-free q / k / v."""
    H, dh = mod.nhead, mod.dh
    q, k, v = x @ mod.q.weight.T, ctx @ mod.k.weight.T, ctx @ mod.v.weight.T
    out = torch.zeros_like(q)
    for g in range(x.shape[0]):
        for i in range(x.shape[1]):
            for h in range(H):
                sl = slice(h * dh, (h + 1) * dh)
                s = torch.stack([q[g, i, sl] @ k[g, j, sl] / math.sqrt(dh) for j in range(ctx.shape[1])])
                if mask is not None:
                    s = torch.where(mask[g], s, torch.full_like(s, -1e300))
                w = torch.softmax(s, 0)
                out[g, i, sl] = (w[:, None] * v[g, :, sl]).sum(0)
    return out @ mod.out.weight.T + mod.out.bias


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randomize(mod):
    """Non-trivial layer-norm affine maps (the defaults 1 and 0 would hide a missing one)."""
    g = torch.Generator().manual_seed(7)
    for m in mod.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype)
            m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype)
    return mod


def test_feed_forward_is_geglu():
    mod = FeedForward(8, 6).double()
    x = rand(3, 5, 8)
    torch.testing.assert_close(mod(x), ff_ref(mod, x), **TOL)
    assert mod.inp.out_features == 12 and mod.outp.in_features == 6


def test_attention_projections_are_bias_free_and_output_has_bias():
    mod = Attention(8, 2)
    assert mod.q.bias is None and mod.k.bias is None and mod.v.bias is None and mod.out.bias is not None


@pytest.mark.parametrize("n", [4, 12])  # both attention backends: broadcast (small sets) and SDPA
def test_attention_weight_dropout(n):
    """Dropout acts on the attention weights in training only: eval mode is the plain attention, p = 1 drops
    every weight (the output is the projection's bias alone), and the average over many draws is unbiased."""
    mod = randomize(Attention(8, 2, dropout=0.3).double())
    x, ctx = rand(2, 3, 8), rand(2, n, 8, seed=1)
    expected = attn_ref(mod, x, ctx)
    mod.eval()
    torch.testing.assert_close(mod(x, ctx), expected, **TOL)
    mod.train()
    torch.manual_seed(0)
    assert not torch.allclose(mod(x, ctx), expected)
    mean = torch.stack([mod(x, ctx) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, expected, rtol=0, atol=0.05)
    mod.dropout = 1.0
    torch.testing.assert_close(mod(x, ctx), mod.out.bias.expand(2, 3, 8), **TOL)


@pytest.mark.parametrize("n", [4, 12])  # both attention backends: broadcast (small sets) and SDPA
@pytest.mark.parametrize("masked", [False, True])
def test_encoder_layer_residual_on_normalised_stream(masked, n):
    torch.manual_seed(0)
    mod = randomize(EncoderLayer(8, 2, 6).double())
    x = rand(3, n, 8)
    mask = torch.rand(3, n, generator=torch.Generator().manual_seed(1)) > 0.4 if masked else None
    if masked:
        mask[1] = False  # a fully masked group stays finite
        mask[0, 0] = True
    h = ln(x, mod.norm1)
    h = attn_ref(mod.attn, h, h, mask) + h
    h = ln(h, mod.norm2)
    expected = ff_ref(mod.ff, h) + h
    torch.testing.assert_close(mod(x, mask), expected, **TOL)


@pytest.mark.parametrize("query_residual", [True, False])
def test_readout_both_output_forms(query_residual):
    """TCA: z = Attn(LN(q), raw kv) + LN(q) + q; CA: z = Attn(LN(q), raw kv) + LN(q); out = FF(LN(z)) + LN(z)."""
    torch.manual_seed(0)
    mod = randomize(ReadOut(8, 2, 6, query_residual=query_residual).double())
    x, ctx = rand(2, 3, 8, seed=1), rand(2, 5, 8, seed=2)
    h = ln(x, mod.norm_q)
    z = attn_ref(mod.attn, h, ctx) + h  # keys and values: the raw context, no norm
    if query_residual:
        z = z + x
    zn = ln(z, mod.norm_out)
    torch.testing.assert_close(mod(x, ctx), ff_ref(mod.ff, zn) + zn, **TOL)


@pytest.mark.parametrize("std_form", ["exp", "bounded"])
def test_head_is_an_mlp_and_std_forms(std_form):
    torch.manual_seed(0)
    head = Head(8, "normal", 2, std_form).double()
    x = rand(4, 8)
    l1, l2 = head.net[0], head.net[2]
    raw = torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    assert l1.out_features == 16
    mean, sd = head.mean_std(head(x))
    torch.testing.assert_close(mean, raw[:, :2], **TOL)
    expected = raw[:, 2:].exp() if std_form == "exp" else 0.05 + 0.95 * torch.log1p(raw[:, 2:].exp())
    torch.testing.assert_close(sd, expected, **TOL)


def test_embedder_form():
    emb = embedder(3, 8, 4)
    kinds = [type(m).__name__ for m in emb]
    assert kinds == ["Linear", "ELU", "Linear", "ELU", "Linear", "ELU", "Linear"]
    assert emb[0].in_features == 3 and all(m.out_features == 8 for m in emb if isinstance(m, torch.nn.Linear))


def test_entropy_term_by_hand_on_a_two_level_tree_with_two_heads():
    """The bonus is each head's -sum p log(p + 1e-9) over the children, averaged over heads and levels."""
    torch.manual_seed(0)
    cfg = ModelConfig(x_dim=1, y_dim=1, out_dim=1, head="normal", reward="ll", d_model=8, nhead=2, dim_ff=8,
                      emb_depth=2, encoder="constant", ordering="coord")
    model = ReTreever(cfg).double().eval()
    g = torch.Generator().manual_seed(3)
    xc = torch.rand(1, 7, 1, generator=g, dtype=torch.float64)
    batch = Batch(xc, torch.rand(1, 7, 1, generator=g, dtype=torch.float64),
                  torch.rand(1, 2, 1, generator=g, dtype=torch.float64),
                  torch.rand(1, 2, 1, generator=g, dtype=torch.float64))
    ctx = model.prepare(batch)
    assert ctx.tree.shape.k == 2  # 7 tokens, b = 2: two levels of choices
    actions = torch.tensor([[[1, 0], [0, 1]]])  # [B, M, k]
    d = S.descend(ctx.kv, ctx.q, actions=actions)
    Wq, Wk = model.readout.attn.q.weight, model.readout.attn.k.weight
    for m in range(2):
        q = ln(model.embed_queries(batch)[0, m], model.readout.norm_q) @ Wq.T
        node, per_level = 0, []
        for s in range(2):
            children = ctx.tree.nodes[s + 1][0, 2 * node:2 * node + 2]  # [2, D] raw embeddings
            k = children @ Wk.T
            ents = []
            for h in range(2):
                sl = slice(4 * h, 4 * h + 4)
                p = torch.softmax(torch.stack([q[sl] @ k[c, sl] / 2.0 for c in range(2)]), 0)
                ents.append(-(p * torch.log(p + 1e-9)).sum())
            per_level.append(sum(ents) / 2)
            node = 2 * node + int(actions[0, m, s])
        torch.testing.assert_close(d.entropy[0, m], sum(per_level) / 2, **TOL)
    # and the model's loss subtracts 0.01 times its mean over queries
    zero = torch.zeros(1, 2, dtype=torch.float64)
    _, terms = model.tca_loss(torch.zeros(1, 2, 2, dtype=torch.float64), batch.yt, zero, d.entropy, None)
    torch.testing.assert_close(terms["loss_rl"], -0.01 * d.entropy.mean(), **TOL)


def test_metric_two_averages_on_two_batches():
    """Batch 1: 2 targets (1.0, 3.0), mean 2; batch 2: 4 targets all 0, mean 0. The paper's metric is the mean of
    batch means (1.0); pooled is 4 / 6."""
    paper, pooled = summarize_metric([torch.tensor([[1.0, 3.0]]), torch.zeros(2, 2)])
    assert paper == pytest.approx(1.0) and pooled == pytest.approx(4.0 / 6.0)
    with pytest.raises(ValueError, match="no evaluation batches"):
        summarize_metric([])
