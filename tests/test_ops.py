"""Eager op counts (benchmarks/ops.py): the number of ATen ops a call launches grows with the tree depth k
only, not with the batch, the bucket size P or the number of tokens."""

import sys
from pathlib import Path

import torch

from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import make_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ops import count  # noqa: E402


def ops(seq_len, b=2, batch=2, what="predict"):
    task = make_task("copy", seq_len=seq_len)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, encoder="constant", branch=b, d_model=16, nhead=2, dim_ff=32,
                                           emb_depth=2, dropout=0.1))
    assert model.tree_shape(task.max_context).k >= 1
    return model.tree_shape(task.max_context), count(model, task.sample(batch, torch.Generator().manual_seed(0)), what)


def test_op_count_does_not_grow_with_batch_or_bucket_size():
    for what in ("predict", "train"):
        (_, a), (_, c) = ops(64, batch=2, what=what), ops(64, batch=5, what=what)
        assert a["all"] == c["all"], what
        # b = 4: 17 and 63 context tokens make trees of the same depth k = 2 with buckets of P = 2 and 4 slots
        (s17, x), (s63, y) = ops(34, b=4, what=what), ops(126, b=4, what=what)
        assert (s17.k, s17.P, s63.k, s63.P) == (2, 2, 2, 4)
        assert x["all"] == y["all"], what


def test_op_count_grows_by_a_constant_per_level():
    counts = [ops(2 ** (j + 2))[1]["all"] for j in range(3, 7)]  # N = 2^j context tokens: k = j - 1
    steps = {b - a for a, b in zip(counts[:-1], counts[1:], strict=True)}
    assert len(steps) == 1, counts  # the same ops per level at every depth: nothing scales with N
    assert steps.pop() < 240  # an aggregator layer, a search step, a level of the read-out (218 with torch 2.13)


def test_greedy_predict_at_4096_tokens_stays_under_its_measured_ceiling():
    """A regression guard on the counts benchmarks/ops.py reports (batch 4, b = 2, the copy model at L = 4,096:
    2,787 ATen events, 831 of them compute ops, with torch 2.13)."""
    task = make_task("copy", seq_len=4096)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, encoder="constant"))
    c = count(model, task.sample(4, torch.Generator().manual_seed(0)), "predict")
    assert c["compute"] <= 900 and c["all"] <= 3000, c
