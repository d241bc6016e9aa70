"""The fused C kernels (tca_env/kernels.py) against the PyTorch code paths they replace.

Every comparison runs both paths on the same inputs: the PyTorch path under ``kernels.disabled()``.
Shapes cover the specialised head width (dh = 16, the paper's model), other widths, b in {2, 3, 4}
and padded trees (masks), where the kernels take their generic branches.
"""

import os
import shutil

import pytest
import torch

from tca_env import kernels
from tca_env import search as S
from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import Batch, make_task
from tca_env.tree import Aggregator, TreeShape, _layout, build_tree

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernels are not built")

SHAPES = [(17, 2, 16), (128, 2, 16), (100, 3, 16), (30, 4, 8), (5, 2, 4), (2, 2, 16), (1, 3, 16), (1000, 2, 16)]


def random_kv(n: int, b: int, dh: int, B: int = 3, M: int = 7, H: int = 4, grad: bool = False, seed: int = 0):
    """A TreeKV with random tables and the real padding pattern of a tree over n tokens."""
    g = torch.Generator().manual_seed(seed)
    shape = TreeShape(n, b)
    counts = _layout(n, b)[0]

    def t(*s):
        return torch.randn(*s, generator=g).requires_grad_(grad)

    keys = [t(B, b ** (s + 1), H, dh) for s in range(shape.k)]
    values = [t(B, b ** (s + 1), H, dh) for s in range(shape.k)]
    masks = []
    for s in range(shape.k):
        m = torch.tensor(counts[s + 1]) > 0
        masks.append(None if bool(m.all()) else m.expand(B, -1).contiguous())
    tok_mask = None if n == shape.num_slots else shape.slot_mask().expand(B, -1).contiguous()
    kv = S.TreeKV(shape, keys, values, masks, t(B, shape.num_slots, H, dh), t(B, shape.num_slots, H, dh), tok_mask)
    return kv, t(B, M, H, dh)


@pytest.mark.parametrize("n,b,dh", SHAPES)
def test_greedy_readout_matches_descend_and_readout(n, b, dh):
    kv, q = random_kv(n, b, dh)
    attn, path = kernels.greedy_readout(kv, q, with_path=True)
    d = S.descend(kv, q, "greedy")
    torch.testing.assert_close(path, d.path, rtol=0, atol=0)
    torch.testing.assert_close(attn, S.readout(kv, q, d.path, d), rtol=1e-5, atol=1e-6)
    # the dispatcher in search.py gives the same, and so does the PyTorch path it falls back to
    with kernels.disabled():
        ref, ref_path = S.greedy_readout(kv, q, with_path=True)
    torch.testing.assert_close(ref_path, path, rtol=0, atol=0)
    torch.testing.assert_close(ref, attn, rtol=1e-5, atol=1e-6)


def test_greedy_never_picks_a_padded_child():
    kv, q = random_kv(37, 3, 16, B=4, M=50)
    _, path = kernels.greedy_readout(kv, q, with_path=True)
    for s in range(kv.shape.k):
        if kv.masks[s] is not None:
            real = kv.masks[s].gather(1, path[..., s + 1])
            assert bool(real.all())


@pytest.mark.parametrize("n,b,dh", SHAPES)
@pytest.mark.parametrize("mode", ["sample", "greedy", "replay"])
def test_training_search_readout_values_and_gradients(n, b, dh, mode):
    kv, q = random_kv(n, b, dh, grad=True, seed=1)
    inputs = [q, kv.tok_keys, kv.tok_values, *kv.keys, *kv.values]
    actions = None
    if mode == "replay":
        with kernels.disabled():
            actions = S.descend(kv, q.detach(), "sample", generator=torch.Generator().manual_seed(5)).actions
    search = "sample" if mode == "replay" else mode
    attn, d = S.search_readout(kv, q, search, actions, torch.Generator().manual_seed(2))
    with kernels.disabled():
        attn_t, d_t = S.search_readout(kv, q, search, actions, torch.Generator().manual_seed(2))
    # the same seed gives the same samples on both paths
    torch.testing.assert_close(d.path, d_t.path, rtol=0, atol=0)
    torch.testing.assert_close(attn, attn_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.log_prob, d_t.log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.entropy, d_t.entropy, rtol=1e-5, atol=1e-5)
    # a fused Descent carries no sibling logits: readout() recomputes them from the path
    torch.testing.assert_close(S.readout(kv, q, d.path, d), attn_t, rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(9)
    wa, wl, we = (torch.randn(x.shape, generator=g) for x in (attn, d.log_prob, d.entropy))
    grads = torch.autograd.grad((attn * wa).sum() + (d.log_prob * wl).sum() + (d.entropy * we).sum(), inputs)
    ref = torch.autograd.grad((attn_t * wa).sum() + (d_t.log_prob * wl).sum() + (d_t.entropy * we).sum(), inputs)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_two_threads_give_the_same_results_as_one():
    kv, q = random_kv(300, 2, 16, B=6, M=200, grad=True)
    inputs = [q, kv.tok_keys, kv.tok_values, *kv.keys, *kv.values]
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            greedy, _ = kernels.greedy_readout(kv, q.detach())
            attn, d = S.search_readout(kv, q, "sample", None, torch.Generator().manual_seed(0))
            grads = torch.autograd.grad(attn.sum() + d.log_prob.sum() + d.entropy.sum(), inputs)
            results.append((greedy, attn, d.path, *grads))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("c,dh,masked", [(2, 16, False), (2, 16, True), (3, 8, True), (5, 16, True), (2, 4, False)])
def test_group_attention_matches_pytorch_with_gradients(c, dh, masked):
    torch.manual_seed(0)
    agg = Aggregator(4 * dh, 4, 32)
    x = torch.randn(45, c, 4 * dh, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(45, c) > 0.4
        mask[0] = False  # a fully padded group
        mask[1] = True
    node, node_mask = agg(x, mask)
    w = torch.randn(node.shape)
    grads = torch.autograd.grad((node * w).sum(), [x, *agg.parameters()])
    with kernels.disabled():
        ref, ref_mask = agg(x, mask)
        ref_grads = torch.autograd.grad((ref * w).sum(), [x, *agg.parameters()])
    torch.testing.assert_close(node, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if masked:
        torch.testing.assert_close(node_mask, ref_mask)
        assert bool((node[~node_mask] == 0).all())  # padded nodes stay exactly zero
    # the no-grad inference path (chunked, mean before the second feed-forward layer) agrees as well
    agg.chunk_groups = 16  # several chunks, the last one partial
    with torch.no_grad():
        fast, _ = agg(x, mask)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_tree_without_kernels_has_the_same_nodes():
    torch.manual_seed(0)
    agg = Aggregator(64, 4, 128).eval()
    enc = torch.randn(3, 77, 64)
    with torch.no_grad():
        fast = build_tree(enc, 2, agg)
        with kernels.disabled():
            ref = build_tree(enc, 2, agg)
    for a, b in zip(fast.nodes, ref.nodes, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len", [64, 250])
def test_fused_predict_matches_the_pytorch_path(seq_len):
    """The streamed low-memory predict() (chunks of trees) against the generic lean path."""
    task = make_task("copy", seq_len=seq_len)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, decoder="tca", encoder="constant")).eval()
    model.fused_chunk_slots = 40  # several chunks of trees, the last one partial
    batch = task.sample(5, torch.Generator().manual_seed(1))
    got = model.predict(batch)
    with kernels.disabled():
        want = model.predict(batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_predict_with_padding_and_kd_ordering():
    torch.manual_seed(0)
    cfg = ModelConfig(x_dim=2, y_dim=1, out_dim=1, head="normal", reward="ll", encoder="constant", branch=3,
                      ordering="kd", max_context=50)
    model = ReTreever(cfg).eval()
    g = torch.Generator().manual_seed(3)
    batch = Batch(xc=torch.rand(3, 50, 2, generator=g), yc=torch.rand(3, 50, 1, generator=g),
                  xt=torch.rand(3, 9, 2, generator=g), yt=torch.rand(3, 9, 1, generator=g))
    got = model.predict(batch)
    with kernels.disabled():
        want = model.predict(batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_training_step_matches_the_pytorch_path():
    """One fused training forward/backward (kernels) against the PyTorch one: loss terms and gradients."""
    task = make_task("copy", seq_len=40)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, decoder="tca", encoder="constant")).train()
    batch = task.sample(4, torch.Generator().manual_seed(1))
    out = model(batch, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    with kernels.disabled():
        ref = model(batch, generator=torch.Generator().manual_seed(2))
        ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.descent.path, ref.descent.path, rtol=0, atol=0)
    for key in ("loss", "loss_tca", "loss_ca", "loss_rl", "entropy"):
        torch.testing.assert_close(out.terms[key], ref.terms[key], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_build_writes_the_library_atomically_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_KERNEL_CACHE", str(tmp_path))
    lib = kernels._build()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".so"  # no temporary file left behind
    assert hasattr(lib, "tca_greedy_readout")
    kernels._build()  # cached: nothing rebuilt
    assert list(tmp_path.iterdir()) == files


def test_without_a_compiler_everything_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TCA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    with pytest.warns(RuntimeWarning, match="using the PyTorch path"):
        assert kernels.library() is None
    assert not os.listdir(tmp_path)  # a failed build leaves nothing behind
    task = make_task("copy", seq_len=32)
    model = ReTreever(ModelConfig.for_task(task, decoder="tca", encoder="constant")).eval()
    out = model.predict(task.sample(2, torch.Generator().manual_seed(0)))
    assert out.shape == (2, 16, 12) and bool(out.isfinite().all())


def test_kernels_env_switch(monkeypatch):
    monkeypatch.setenv("TCA_KERNELS", "0")
    assert kernels.library() is None
    monkeypatch.delenv("TCA_KERNELS")
    assert kernels.library() is not None


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no compiler")
def test_compiler_errors_are_reported(tmp_path, monkeypatch):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(kernels, "SOURCE", bad)
    monkeypatch.setenv("TCA_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="compiling bad.c failed"):
        kernels._build()



@pytest.mark.parametrize("n,b", [(128, 2), (50, 3), (37, 2), (2, 2), (1, 2), (100, 4), (64, 2)])
def test_fused_training_aggregation_matches_autograd(n, b):
    """The one-node training aggregation (fused_tree.py) against the per-level autograd graph: every
    level's nodes and masks, and the gradient of every aggregator parameter."""
    torch.manual_seed(0)
    agg = Aggregator(64, 4, 128)
    with torch.no_grad():  # non-trivial norm weights, so the folded affine maps are exercised
        for norm in (agg.norm1, agg.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    enc = torch.randn(3, n, 64) * 2 + 0.5
    tree = build_tree(enc, b, agg)
    assert tree.all_nodes is not None  # the fused path was taken
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(x.shape, generator=g) for x in tree.nodes]
    loss = sum((x * w).sum() for x, w in zip(tree.nodes, weights, strict=True))
    grads = torch.autograd.grad(loss, list(agg.parameters()))
    with kernels.disabled():
        ref = build_tree(enc, b, agg)
        assert ref.all_nodes is None
        ref_loss = sum((x * w).sum() for x, w in zip(ref.nodes, weights, strict=True))
        ref_grads = torch.autograd.grad(ref_loss, list(agg.parameters()))
    for got, want, m, wm in zip(tree.nodes, ref.nodes, tree.node_mask, ref.node_mask, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m, wm)
    for (name, _), got, want in zip(agg.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda s, name=name: f"{name}: {s}")


FORK_SCRIPT = """
import os, sys, torch
from tca_env import kernels
from tests.test_kernels import random_kv
torch.set_num_threads(2)
kv, q = random_kv(300, 2, 16, B=6, M=200)
want, _ = kernels.greedy_readout(kv, q)  # creates the thread pool in the parent
pid = os.fork()
if pid == 0:  # the child inherits the pool object but not its threads
    got, _ = kernels.greedy_readout(kv, q)
    os._exit(0 if torch.equal(got, want) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernels_work_in_a_forked_child_after_threads_were_used():
    """Run in a fresh interpreter (no other test's thread state), with a timeout: a child that reused
    the parent's dead pool would hang."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", FORK_SCRIPT], cwd=root, timeout=120, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
