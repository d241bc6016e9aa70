"""Read-outs against plain references, losses, and clear errors on bad input."""

import math

import pytest
import torch

from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import Batch, make_task


def copy_model(decoder="tca", seq_len=16, **kw):
    torch.manual_seed(0)
    task = make_task("copy", seq_len=seq_len)
    cfg = ModelConfig.for_task(task, decoder=decoder, d_model=16, nhead=2, dim_ff=32, emb_depth=2,
                               encoder="constant", **kw)
    return ReTreever(cfg).eval(), task.sample(3, torch.Generator().manual_seed(1))


def reference_cross_attention(mod, x, ctx):
    """The CA decoder written out from the module's weights: a = softmax(Q K^T / sqrt(dh)) V over the raw
    context + LN(q); out = FF(LN(a)) + LN(a), with a GEGLU feed-forward."""
    H, dh = mod.nhead, mod.dh
    h = mod.norm_q(x)
    q, k, v = h @ mod.attn.q.weight.T, ctx @ mod.attn.k.weight.T, ctx @ mod.attn.v.weight.T
    outs = []
    for i in range(H):
        sl = slice(i * dh, (i + 1) * dh)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh), dim=-1)
        outs.append(w @ v[..., sl])
    a = torch.cat(outs, -1) @ mod.attn.out.weight.T + mod.attn.out.bias + h
    z = mod.norm_out(a)
    u = z @ mod.ff.inp.weight.T + mod.ff.inp.bias
    half = u.shape[-1] // 2
    ff = (u[..., :half] * torch.nn.functional.gelu(u[..., half:])) @ mod.ff.outp.weight.T + mod.ff.outp.bias
    return ff + z


@torch.no_grad()
def test_ca_readout_equals_reference_cross_attention():
    model, batch = copy_model("ca")
    enc, qe = model.encode_context(batch), model.embed_queries(batch)
    expected = model.head(reference_cross_attention(model.readout, qe, enc))
    torch.testing.assert_close(model.predict(batch), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,b", [(1, 2), (2, 2), (3, 4), (4, 4)])
@torch.no_grad()
def test_tca_with_depth_zero_tree_equals_ca(n, b):
    torch.manual_seed(0)
    cfg = ModelConfig(x_dim=1, y_dim=1, out_dim=1, head="normal", reward="ll", d_model=16, nhead=2, dim_ff=32,
                      emb_depth=2, encoder="quadratic", enc_layers=1, branch=b, ordering="coord")
    model = ReTreever(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.rand(2, n, 1, generator=g), torch.rand(2, n, 1, generator=g),
                  torch.rand(2, 7, 1, generator=g), torch.rand(2, 7, 1, generator=g))
    ctx = model.prepare(batch)
    assert ctx.tree.shape.k == 0
    out = model(batch, search="greedy", with_ca=True)
    torch.testing.assert_close(out.out, out.out_ca, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_perceiver_uses_retrieved_size_latents_and_predicts():
    model, batch = copy_model("perceiver", seq_len=64)
    assert model.num_latents == model.tree_shape(32).retrieved_size == 6
    out = model.predict(batch)
    assert out.shape == (3, 32, 12) and torch.isfinite(out).all()


def test_training_forward_has_every_loss_term():
    model, batch = copy_model("tca")
    model.train()
    out = model(batch, generator=torch.Generator().manual_seed(0))
    for key in ("loss", "loss_tca", "loss_ca", "loss_rl", "reward", "entropy", "tokens", "token_frac"):
        assert key in out.terms and math.isfinite(float(out.terms[key]))
    expected = out.terms["loss_tca"] + out.terms["loss_ca"] + out.terms["loss_rl"]
    torch.testing.assert_close(out.terms["loss"], expected)
    out.loss.backward()
    # RL reaches the query projection through the policy; L_CA reaches the encoder-side embedder.
    assert model.readout.attn.q.weight.grad.abs().sum() > 0
    assert model.ctx_embed[0].weight.grad.abs().sum() > 0
    assert model.aggregator.attn.q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("reward", ["acc", "nce"])
def test_classification_rewards(reward):
    model, _ = copy_model(reward=reward)
    logits = torch.tensor([[[2.0, 0.0, -1.0] + [-9.0] * 9, [0.0, 3.0, 0.0] + [-9.0] * 9]])
    y = torch.tensor([[0, 0]])
    r = model.head.reward(logits, y, reward)
    if reward == "acc":
        assert r.tolist() == [[1.0, 0.0]]
    else:
        ce = torch.nn.functional.cross_entropy(logits[0], y[0], reduction="none")
        torch.testing.assert_close(r[0], math.log(12) - ce)


def test_bad_inputs_raise_clear_errors():
    model, batch = copy_model()
    with pytest.raises(ValueError, match="x_dim"):
        model.predict(Batch(batch.xc[..., :5], None, batch.xt, batch.yt, batch.pc, batch.pt))
    nan = batch.xc.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.predict(Batch(nan, None, batch.xt, batch.yt, batch.pc, batch.pt))
    with pytest.raises(ValueError, match="empty batch"):
        model.predict(Batch(batch.xc[:0], None, batch.xt[:0], batch.yt[:0], batch.pc, batch.pt))
    with pytest.raises(ValueError, match=r"\[B, N, dx\]"):
        model.predict(Batch(batch.xc[0], None, batch.xt, batch.yt, batch.pc, batch.pt))
    with pytest.raises(ValueError, match="positions"):
        model.predict(Batch(batch.xc, None, batch.xt, batch.yt))
    with pytest.raises(ValueError, match="unknown decoder"):
        ModelConfig(decoder="lstm").validate()
    with pytest.raises(ValueError, match="unknown task"):
        make_task("sudoku")
    with pytest.raises(ValueError, match="needs a regression head"):
        ModelConfig(head="class", reward="ll").validate()
