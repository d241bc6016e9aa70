"""The batched search against a slow per-query reference, and REINFORCE against its closed form."""

import pytest
import torch

from tca_env import backend
from tca_env import search as S
from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import Batch


def small_model(n=23, b=3, nhead=2, d=16, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(x_dim=2, y_dim=1, out_dim=1, head="normal", reward="ll", d_model=d, nhead=nhead, dim_ff=32,
                      emb_depth=2, encoder="constant", branch=b, ordering="coord", max_context=n, **kw)
    model = ReTreever(cfg).eval()
    g = torch.Generator().manual_seed(3)
    batch = Batch(xc=torch.rand(2, n, 2, generator=g), yc=torch.rand(2, n, 1, generator=g),
                  xt=torch.rand(2, 5, 2, generator=g), yt=torch.rand(2, 5, 1, generator=g))
    return model, batch


def reference_descent(model, ctx, actions=None):
    """Slow reference: per query, walk the tree, project children from their embeddings, score per head."""
    tree, shape = ctx.tree, ctx.tree.shape
    B, M = ctx.q.shape[:2]
    log_prob = torch.zeros(B, M)
    ent = torch.zeros(B, M)
    greedy = torch.zeros(B, M, shape.k, dtype=torch.long)
    for bi in range(B):
        for m in range(M):
            node = 0
            for s in range(shape.k):
                kids = [node * shape.b + c for c in range(shape.b)]
                emb = tree.nodes[s + 1][bi, kids]  # [b, D]
                keys, _ = model.readout.keys_values(emb)  # [b, H, dh]
                real = tree.node_mask[s + 1][bi, kids]
                per_head = []
                for h in range(keys.shape[1]):
                    sc = torch.stack([ctx.q[bi, m, h] @ keys[c, h] for c in range(shape.b)])
                    sc = torch.where(real, sc, torch.tensor(-1e30))
                    per_head.append(torch.softmax(sc, 0))
                p = torch.stack(per_head).mean(0) * real
                greedy[bi, m, s] = int(p.argmax())
                a = int(actions[bi, m, s]) if actions is not None else greedy[bi, m, s]
                log_prob[bi, m] += torch.log(p[a])
                # the bonus: each head's entropy (masked children have p = 0), averaged over heads and levels
                ent[bi, m] -= sum(float(x * torch.log(x + 1e-9)) for ph in per_head for x in ph * real) \
                    / len(per_head) / shape.k
                node = kids[a]
    return greedy, log_prob, ent


@torch.no_grad()
def test_greedy_descent_picks_argmax_at_every_level():
    model, batch = small_model()
    ctx = model.prepare(batch)
    d = S.descend(ctx.kv, ctx.q, "greedy")
    greedy, log_prob, ent = reference_descent(model, ctx)
    assert torch.equal(d.actions, greedy)
    torch.testing.assert_close(d.log_prob, log_prob, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.entropy, ent, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_sampled_log_prob_is_sum_of_chosen_children():
    model, batch = small_model(n=40, b=2)
    ctx = model.prepare(batch)
    g = torch.Generator().manual_seed(7)
    d = S.descend(ctx.kv, ctx.q, "sample", generator=g)
    _, log_prob, ent = reference_descent(model, ctx, d.actions)
    torch.testing.assert_close(d.log_prob, log_prob, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.entropy, ent, rtol=1e-4, atol=1e-5)
    # Sampled paths only visit real nodes, and the same generator seed replays the same path.
    assert torch.equal(S.descend(ctx.kv, ctx.q, "sample", generator=torch.Generator().manual_seed(7)).path, d.path)


def test_sampling_matches_policy_distribution():
    logp = torch.log(torch.tensor([[[0.1, 0.6, 0.0, 0.3]]])).expand(1, 20000, 4)
    a = S.choose(logp, "sample", torch.Generator().manual_seed(0))
    freq = torch.bincount(a.flatten(), minlength=4).float() / a.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.0, 0.3]), atol=0.015, rtol=0)
    assert int((a == 2).sum()) == 0


def test_step_by_step_equals_whole_descent_and_replay():
    model, batch = small_model(n=30, b=2)
    ctx = model.prepare(batch)
    d = S.descend(ctx.kv, ctx.q, "sample", generator=torch.Generator().manual_seed(1))
    node = torch.zeros(2, 5, dtype=torch.long)
    log_prob = torch.zeros(2, 5)
    for s in range(ctx.kv.shape.k):
        r = S.step(ctx.kv, ctx.q, s, node, action=d.actions[..., s])
        log_prob += r.log_probs.gather(-1, r.action.unsqueeze(-1)).squeeze(-1)
        node = r.node
    assert torch.equal(node, d.path[..., -1])
    torch.testing.assert_close(log_prob, d.log_prob)
    replay = S.descend(ctx.kv, ctx.q, actions=d.actions)
    torch.testing.assert_close(replay.log_prob, d.log_prob)
    # The read-out recomputing scores from the path equals the one reusing the descent's scores.
    torch.testing.assert_close(model.predict_path(ctx, d.path), model.predict_path(ctx, d.path, d))


def test_readout_equals_reference_attention_over_gathered_S():
    model, batch = small_model(n=50, b=3)
    with torch.no_grad():
        ctx = model.prepare(batch)
        d = S.descend(ctx.kv, ctx.q, "sample", generator=torch.Generator().manual_seed(2))
        out = S.readout(ctx.kv, ctx.q, d.path, d)
        rs = S.retrieved_set(ctx.tree, d.path)
        emb = rs.embeddings(ctx.tree)  # [B, M, |S|, D]
        k, v = model.readout.keys_values(emb)  # [B, M, |S|, H, dh]
        sc = torch.einsum("bmhd,bmshd->bmhs", ctx.q, k).masked_fill(~rs.mask[:, :, None, :], float("-inf"))
        ref = torch.einsum("bmhs,bmshd->bmhd", sc.softmax(-1), v)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nhead", [1, 2])
def test_reinforce_gradient_matches_closed_form(nhead):
    """d/ds of -(log pi(a)) R - c H(pi), with pi = mean_h softmax(s_h), against the analytic gradient."""
    torch.manual_seed(0)
    b, c, R, a = 3, 0.01, 0.7, 1
    s = torch.randn(1, 1, b, nhead, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 1, b, dtype=torch.bool)
    logp = S.policy_log_probs(S.head_probs(s, mask), mask)
    loss = -(logp[..., a] * R).sum() - c * S.entropy(logp).sum()
    loss.backward()

    with torch.no_grad():
        q = torch.softmax(s[0, 0], dim=0)  # [b, H] per-head softmax
        p = q.mean(1)  # [b]
        H = -(p * p.log()).sum()
        # dp_j / ds_{i,h} = q_{j,h} (1[i=j] - q_{i,h}) / nhead
        jac = torch.zeros(b, b, nhead, dtype=torch.float64)  # [j, i, h]
        for j in range(b):
            for i in range(b):
                jac[j, i] = q[j] * ((1.0 if i == j else 0.0) - q[i]) / nhead
        dlogpa = jac[a] / p[a]
        dH = -((p.log() + 1).view(b, 1, 1) * jac).sum(0)
        expected = -R * dlogpa - c * dH
    torch.testing.assert_close(s.grad[0, 0], expected)
    if nhead == 1:  # the textbook form: -R (onehot - p) + c p (log p + H)
        onehot = torch.nn.functional.one_hot(torch.tensor(a), b).double()
        textbook = -R * (onehot - p) + c * p * (p.log() + H)
        torch.testing.assert_close(s.grad[0, 0, :, 0], textbook)


def test_model_rl_loss_is_reinforce_with_reward():
    """tca_loss's RL term: gradient wrt the path log-prob is -(R - baseline) / (B*M), per query."""
    model, _ = small_model()
    model.cfg.reward = "mse"
    out = torch.randn(1, 4, 2)
    y = torch.randn(1, 4, 1)
    log_prob = torch.zeros(1, 4, requires_grad=True)
    ent = torch.zeros(1, 4)
    model.cfg.lambda_rl = 1.0
    loss, terms = model.tca_loss(out, y, log_prob, ent, None)
    loss.backward()
    reward = -(out[..., :1] - y).pow(2).mean(-1)
    torch.testing.assert_close(log_prob.grad, -reward / 4)
    torch.testing.assert_close(terms["reward"], reward.mean())


@pytest.mark.parametrize("n,b,be", [(23, 3, "torch"), (40, 2, "torch"), (64, 2, "torch"), (17, 4, "torch"),
                                    (23, 3, "compile")])
def test_inference_fast_path_equals_autograd_path(n, b, be):
    """predict() (in-place gathers into a workspace, no path statistics, lean context) gives the same
    output as the autograd forward on the same greedy paths, with and without padded levels, on each
    backend (the compiled one where a C++ compiler exists)."""
    if be == "compile" and not backend.compile_available():
        pytest.skip("torch.compile needs a C++ compiler")
    model, batch = small_model(n=n, b=b)
    backend.set_backend(be)
    try:
        fast = model.predict(batch)
        slow = model(batch, search="greedy", with_ca=False)
    finally:
        backend.set_backend(None)
    assert slow.out.requires_grad
    torch.testing.assert_close(fast, slow.out.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b", [2, 3])
def test_head_probs_is_each_heads_masked_softmax(b):
    """head_probs (a sigmoid of the score difference when b = 2) against the textbook softmax in float64: values
    (a probability of e^-60 keeps its relative precision), masked children at exactly 0, and gradients."""
    g = torch.Generator().manual_seed(b)
    scores = (torch.randn(3, 5, b, 4, generator=g, dtype=torch.float64) * 5)
    scores[0, 0, 0] += 60.0  # a child far ahead: the other's probability is about e^-60
    mask = torch.rand(3, 5, b, generator=g) > 0.3
    mask[..., 0] = True  # at least one real child
    for m in (None, mask):
        s1 = scores.clone().requires_grad_()
        s2 = scores.clone().requires_grad_()
        probs = S.head_probs(s1, m)
        ref = (s2 if m is None else s2.masked_fill(~m.unsqueeze(-1), float("-inf"))).softmax(2)
        torch.testing.assert_close(probs, ref, rtol=1e-12, atol=0)
        w = torch.randn(probs.shape, generator=g, dtype=torch.float64)
        (probs * w).sum().backward()
        (ref * w).sum().backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)
    assert (S.head_probs(scores, mask)[~mask] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_underflowed_child_probability_keeps_gradients_finite(masked):
    # A score gap of 400 underflows one child's probability to exactly 0 in float32.
    scores = torch.tensor([200.0, -200.0, 0.0]).view(1, 1, 3, 1).expand(1, 1, 3, 2).clone().requires_grad_()
    mask = torch.tensor([[[True, True, not masked]]])
    probs = S.head_probs(scores, mask)
    logp = S.policy_log_probs(probs, mask)
    assert torch.isfinite(logp[..., :2]).all() and (logp[..., 2].isinf().item() == masked)
    (S.head_entropy(probs).sum() + S.entropy(logp).sum() + logp[..., 0].sum()).backward()
    assert torch.isfinite(scores.grad).all()


@torch.no_grad()
def test_policy_dropout_is_the_references_noisy_sampling():
    """Off, it changes nothing; with every weight dropped, a node's children are sampled uniformly (real ones
    only) where the reference's sampler would fail; in between, the log-probabilities are those of the
    dropped, unnormalised per-head weights averaged over heads."""
    model, batch = small_model()
    ctx = model.prepare(batch)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    base = S.descend(ctx.kv, ctx.q, "sample", generator=g())
    same = S.descend(ctx.kv, ctx.q, "sample", generator=g(), policy_dropout=0.0)
    assert torch.equal(base.path, same.path) and torch.equal(base.log_prob, same.log_prob)
    r = S.step(ctx.kv, ctx.q, 0, torch.zeros(2, 5, dtype=torch.long), "sample", generator=g(), policy_dropout=1.0)
    assert torch.isfinite(r.log_probs[r.mask] if r.mask is not None else r.log_probs).all()
    assert (r.probs == 0).all()  # every weight dropped
    torch.manual_seed(0)
    r = S.step(ctx.kv, ctx.q, 0, torch.zeros(2, 5, dtype=torch.long), "sample", generator=g(), policy_dropout=0.5)
    kept = r.probs.mean(-1)  # [B, M, b] the dropped, rescaled weights averaged over heads
    torch.testing.assert_close(r.log_probs.exp(), kept.clamp_min(torch.finfo(kept.dtype).tiny))
