"""The matmul route (tca_env.backend.matmul_scope): large float32 CPU products of a model on oneDNN where a probe
finds it exact, the same numbers and greedy paths as the default route, the setting restored, small calls and
few queries left on the default route."""

import pytest
import torch

from tca_env import backend
from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import make_task
from training.config import build_config
from training.cotrain import Trainer

needs_knob = pytest.mark.skipif(backend._knob() is None, reason="this torch has no oneDNN float32 matmul setting")
# The tests that compare numbers across routes need oneDNN to compute in float32 here (no AMX), as the probe checks.
needs_exact_onednn = pytest.mark.skipif(
    backend._knob() is None or "rounds" in backend.onednn_probe()[1],
    reason="oneDNN rounds float32 products to bfloat16 on this CPU (or this torch has no oneDNN setting)")


@pytest.fixture(autouse=True)
def restore_route():
    yield
    backend.set_matmul(None)


def knob_now() -> str:
    return torch.backends.mkldnn.matmul.fp32_precision


def test_route_choice_from_env_var_and_function(monkeypatch):
    monkeypatch.setenv(backend.MATMUL_ENV_VAR, "default")
    assert backend.set_matmul(None) == "default" == backend.matmul_route()
    assert "CPU matmuls: default" in backend.describe()
    monkeypatch.setenv(backend.MATMUL_ENV_VAR, "blas")
    with pytest.raises(ValueError, match="not a matmul route"):
        backend.set_matmul(None)
    with pytest.raises(ValueError, match="not a matmul route"):
        backend.set_matmul("fast")
    monkeypatch.delenv(backend.MATMUL_ENV_VAR)
    assert backend.set_matmul("default") == "default"
    assert backend.describe().endswith("CPU matmuls: default")  # chosen, so no probe verdict beside it
    # auto follows the probe's verdict, which the log line gives
    assert backend.set_matmul("auto") == ("onednn" if backend.onednn_probe()[0] else "default")
    assert backend.onednn_probe()[1] in backend.describe()


@needs_knob
def test_probe_verdict_agrees_with_an_independent_error_measurement():
    """At a shape the probe does not use, oneDNN's error against float64 is float32's (the probe says exact) or far
    larger (the probe says it rounds); a timing-only refusal says so."""
    g = torch.Generator().manual_seed(5)
    a, w = torch.randn(2048, 96, generator=g), torch.randn(96, 160, generator=g)
    ref = a.double() @ w.double()
    knob = torch.backends.mkldnn.matmul
    prev = knob.fp32_precision
    try:
        knob.fp32_precision = "ieee"
        err_blas = float((a @ w - ref).abs().max())
        knob.fp32_precision = "bf16"
        err = float((a @ w - ref).abs().max())
    finally:
        knob.fp32_precision = prev
    ok, why = backend.onednn_probe()
    if ok or "not faster" in why:
        assert err <= 8 * err_blas + 1e-6, (err, err_blas, why)
    else:
        assert "rounds" in why and err > 8 * err_blas, (err, err_blas, why)


def _recall_model(decoder="tca", n=1500):
    task = make_task("recall", context_len=n, num_queries=1100)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, decoder=decoder, d_model=32, nhead=2, dim_ff=64)).eval()
    return model, task.sample(1, torch.Generator().manual_seed(1))


def _record_knob(module: torch.nn.Module, seen: list[str]):
    return module.register_forward_pre_hook(lambda *_: seen.append(knob_now()))


@needs_exact_onednn
def test_tca_build_and_queries_take_the_route_with_the_default_numbers():
    model, batch = _recall_model()
    outside = knob_now()
    with torch.no_grad():
        assert backend.set_matmul("default") == "default"
        ref_ctx = model.build(batch, lean=True)
        ref = model.query(ref_ctx, batch.xt)
        backend.set_matmul("onednn")
        seen: list[str] = []
        hooks = [_record_knob(model.aggregator, seen), _record_knob(model.query_embed, seen)]
        ctx = model.build(batch, lean=True)  # 1,500 tokens and 1,100 queries: both above onednn_min_rows
        out = model.query(ctx, batch.xt)
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {"bf16"}  # every aggregator call and the query embedding ran on the route
    assert knob_now() == outside  # restored
    for name in ("node_keys", "node_values", "tok_keys", "tok_values"):
        torch.testing.assert_close(getattr(ctx.kv, name), getattr(ref_ctx.kv, name), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@needs_knob
def test_small_calls_keep_the_default_route_for_every_decoder():
    """Below onednn_min_rows rows nothing changes; scopes nest; a ca model builds on the route and answers a
    few queries (where fused attention over all tokens is slower on oneDNN) on the default one."""
    backend.set_matmul("onednn")
    outside = knob_now()
    with backend.matmul_scope(backend.onednn_min_rows - 1):
        assert knob_now() == outside
    with backend.matmul_scope(backend.onednn_min_rows):
        assert knob_now() == "bf16"
        with backend.matmul_scope(10 * backend.onednn_min_rows):  # nests
            assert knob_now() == "bf16"
        assert knob_now() == "bf16"
    assert knob_now() == outside
    model, batch = _recall_model("ca")
    seen: list[str] = []
    hooks = [_record_knob(model.ctx_embed, seen), _record_knob(model.query_embed, seen)]
    with torch.no_grad():
        ctx = model.build(batch)  # 1,500 tokens: the route
        model.query(ctx, batch.xt[:, :64])  # 64 queries: the default
    for h in hooks:
        h.remove()
    assert seen == ["bf16", outside]
    backend.set_matmul("default")
    with backend.matmul_scope(10**9):
        assert knob_now() == outside


@needs_exact_onednn
@pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Seems like")
def test_training_step_runs_forward_and_backward_on_the_route(tmp_path):
    """The trainer's backward runs under the forward's route (a backward hook records the setting), and the step's
    loss and gradients equal the default route's."""
    cfg = build_config(task="recall", context_len=1024, task_args='{"num_queries": 64}', d_model=16, nhead=2,
                       dim_ff=32, batch_size=2, eval_size=2, eval_batch=2, progress=False, eval_every=0,
                       ckpt_every=0, log_every=1, run_dir=str(tmp_path / "run"))
    grads, stats, seen = {}, {}, []
    for route in ("default", "onednn"):
        backend.set_matmul(route)
        tr = Trainer(cfg)
        batch = tr.task.sample(cfg.batch_size, torch.Generator().manual_seed(3))
        hook = tr.model.aggregator.register_full_backward_pre_hook(lambda *_, r=route: seen.append((r, knob_now())))
        params = list(tr.model.parameters())
        tr.opt.step = lambda: None  # keep the weights: compare the gradients of one step
        stats[route] = tr.train_step(batch)
        grads[route] = [p.grad.clone() for p in params if p.grad is not None]
        hook.remove()
    assert ("onednn", "bf16") in seen and all(v != "bf16" for r, v in seen if r == "default")
    assert stats["onednn"]["loss"] == pytest.approx(stats["default"]["loss"], rel=1e-4, abs=1e-6)
    for a, b in zip(grads["onednn"], grads["default"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@needs_exact_onednn
def test_the_vector_envs_reset_and_leaf_read_out_take_the_route():
    """A vector env of 1,024 queries over a recall tree: the build, the queries' embedding and the leaf read-out run
    on the route (hooks record the setting), and the rewards equal the default route's."""
    import gymnasium as gym

    import tca_env  # noqa: F401 - registers the env

    rewards, seen = {}, {}
    for route in ("default", "onednn"):
        backend.set_matmul(route)
        model, _ = _recall_model(n=1200)
        env = gym.make_vec("TreeRetrieval-v0", num_envs=1024, vectorization_mode="vector_entry_point", task="recall",
                           task_options={"context_len": 1200, "num_queries": 1024}, predictor=model)
        seen[route] = []
        hooks = [_record_knob(m, seen[route]) for m in (model.aggregator, model.query_embed, model.head)]
        env.reset(seed=0)
        for _ in range(env.unwrapped.queries.k):
            _, reward, *_ = env.step(torch.zeros(1024, dtype=torch.long).numpy())
        rewards[route] = reward  # the leaf rewards of the last step
        for h in hooks:
            h.remove()
        env.close()
    assert set(seen["onednn"]) == {"bf16"} and "bf16" not in seen["default"]
    assert len(seen["onednn"]) == len(seen["default"]) > 2  # the build, the query embedding and the read-out
    torch.testing.assert_close(torch.as_tensor(rewards["onednn"]), torch.as_tensor(rewards["default"]), rtol=1e-4,
                               atol=1e-5)
