"""The one dispatch point (tca_env.backend): eager by default, torch.compile with fullgraph=True on request,
and the same numbers and the same greedy retrieved sets on every backend."""

import pytest
import torch

from tca_env import backend
from tca_env import search as S
from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import make_task

needs_compiler = pytest.mark.skipif(not backend.compile_available(), reason="torch.compile needs a C++ compiler")


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    backend.set_backend(None)


def test_choice_from_env_var_and_function(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.set_backend(None) == "torch" == backend.backend()
    assert "eager" in backend.describe()
    monkeypatch.setenv(backend.ENV_VAR, "kernels")
    with pytest.raises(ValueError, match="no hand-written kernels"):
        backend.set_backend(None)
    with pytest.raises(ValueError, match="not a backend"):
        backend.set_backend("jax")
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.set_backend(None) == "torch"


def test_compile_falls_back_to_eager_with_a_warning_without_a_compiler(monkeypatch):
    monkeypatch.setattr(backend, "compile_available", lambda: False)
    with pytest.warns(UserWarning, match="C\\+\\+ compiler"):
        assert backend.set_backend("compile") == "torch"


def _copy_model(seq_len=32, **kw):
    task = make_task("copy", seq_len=seq_len)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, encoder="constant", d_model=16, nhead=2, dim_ff=32, emb_depth=2, **kw))
    return task, model, task.sample(3, torch.Generator().manual_seed(1))


@needs_compiler
def test_greedy_predict_and_training_forward_trace_as_one_graph_each():
    """fullgraph tracing: no graph breaks in greedy inference (a padded GP tree with an encoder) or in the
    sampled training forward with dropout, L_CA and L_RL (the copy task)."""
    gp = make_task("gp")
    torch.manual_seed(0)
    m = ReTreever(ModelConfig.for_task(gp, d_model=16, nhead=2, dim_ff=32, emb_depth=2, enc_layers=1)).eval()
    batch = gp.sample(2, torch.Generator().manual_seed(0))
    assert batch.N != m.tree_shape(batch.N).num_slots  # the tree has padded slots
    with torch.no_grad():
        ex = torch._dynamo.explain(m._predict)(batch, None)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons

    _, model, batch = _copy_model(dropout=0.1, policy_dropout=True)
    model.train()
    shape = model.tree_shape(batch.N)
    noise = S.gumbel_noise((shape.k, batch.B, batch.M, shape.b), batch.xt, torch.Generator().manual_seed(2))
    ex = torch._dynamo.explain(model._forward)(batch, "sample", None, noise, True)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


@needs_compiler
def test_compiled_backend_gives_the_eager_numbers_and_greedy_paths():
    _, model, batch = _copy_model()
    model.eval()
    eager_pred = model.predict(batch)
    eager = model(batch, search="greedy", with_ca=True)
    gen = torch.Generator().manual_seed(4)
    model.train()
    eager_train = model(batch, generator=gen)
    eager_train.loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()

    assert backend.set_backend("compile") == "compile"
    model.eval()
    torch.testing.assert_close(model.predict(batch), eager_pred, rtol=1e-4, atol=1e-5)
    comp = model(batch, search="greedy", with_ca=True)
    assert torch.equal(comp.descent.path, eager.descent.path)  # the same greedy S on both backends
    model.train()
    comp_train = model(batch, generator=gen.manual_seed(4))
    assert torch.equal(comp_train.descent.path, eager_train.descent.path)  # same noise, same sampled paths
    torch.testing.assert_close(comp_train.loss, eager_train.loss, rtol=1e-4, atol=1e-5)
    comp_train.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(eager_grads) > 10
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


@needs_compiler
def test_compiled_aggregator_chunks_build_the_eager_tree():
    """On the compile backend a chunked build (large contexts) runs the aggregator's full chunks through one
    compiled graph: the same tree (node keys and values; the padded leaf buckets' masks go through the graph) and
    greedy answers as eager, and a whole compiled predict with chunks still traces as one graph (chunks inline)."""
    task = make_task("recall", context_len=300, num_queries=40)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, d_model=16, nhead=2, dim_ff=32, emb_depth=2)).eval()
    batch = task.sample(2, torch.Generator().manual_seed(1))
    assert batch.N != model.tree_shape(batch.N).num_slots  # padded: masks go through the compiled graph too
    with torch.no_grad():
        eager = model.build(batch, lean=True, chunk=64)
        eager_pred = model.query(eager, batch.xt)
        assert backend.set_backend("compile") == "compile"
        comp = model.build(batch, lean=True, chunk=64)
        assert "forward" in backend._compiled.get(model.aggregator, {})  # the chunks did go through the backend
        for name in ("node_keys", "node_values", "tok_keys", "tok_values"):
            torch.testing.assert_close(getattr(comp.kv, name), getattr(eager.kv, name), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.query(comp, batch.xt), eager_pred, rtol=1e-4, atol=1e-5)
        assert "_query" in backend._compiled.get(model, {})  # a query on a built tree goes through the graph too
        ex = torch._dynamo.explain(model._predict)(batch, 64)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


@needs_compiler
@pytest.mark.parametrize("decoder", ["tca", "ca", "perceiver"])
def test_compiled_query_cuts_long_query_batches_into_chunks_outside_the_graph(monkeypatch, decoder):
    """A built context queried on the compile backend: chunks of ``greedy_chunk`` queries (the last one shorter),
    each one compiled graph with no breaks, give eager's answers; a malformed query batch is refused before any
    graph."""
    task = make_task("recall", context_len=200, num_queries=40)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, decoder=decoder, d_model=16, nhead=2, dim_ff=32,
                                           emb_depth=2)).eval()
    batch = task.sample(2, torch.Generator().manual_seed(3))
    monkeypatch.setattr(S, "greedy_chunk", 2 * 16)  # 16 queries per chunk for B = 2: chunks of 16, 16 and 8
    sizes, call = [], backend.call
    monkeypatch.setattr(backend, "call", lambda m, name, *a: sizes.append((name, a[1].shape[1])) or call(m, name, *a))
    with torch.no_grad():
        ctx = model.build(batch, lean=True)
        eager = model.query(ctx, batch.xt)
        assert backend.set_backend("compile") == "compile"
        comp = model.query(ctx, batch.xt)
        ex = torch._dynamo.explain(model._query)(ctx, batch.xt[:, :16], None)
        with pytest.raises(ValueError, match="queries must be"):
            model.query(ctx, batch.xt[0])
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    assert torch.equal(comp.argmax(-1), eager.argmax(-1))
    assert sizes == [("_query", 16), ("_query", 16), ("_query", 8)]
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
