"""benchmarks/breakdown.py: its matrix-product count of the training tree (the "floor" it reports) and a
tiny end-to-end run. Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import flop_counter

from tca_env import kernels
from tca_env import search as S
from tca_env.model import ReadOut
from tca_env.tree import Aggregator, build_tree

ROOT = Path(__file__).resolve().parents[1]


def load_breakdown():
    spec = importlib.util.spec_from_file_location("breakdown", ROOT / "benchmarks" / "breakdown.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(kernels.library() is None, reason="the fused training aggregation needs a C compiler")
@pytest.mark.parametrize("n,b", [(128, 2), (100, 3), (17, 2)])
def test_tree_flop_count_matches_counted_products(n, b):
    """tree_train_flops equals the matrix-product flops torch counts for the training aggregation's
    forward + backward and the node keys/values' forward + backward (within the bias-sized products)."""
    torch.manual_seed(0)
    B, D, H, F_ = 3, 32, 4, 48
    agg, ro = Aggregator(D, H, F_), ReadOut(D, H, F_)
    enc = torch.randn(B, n, D)
    # torch's counter has no entry for the in-place addmm_ (the feed-forward's second product): count it as addmm
    def addmm_inplace(self_shape, a_shape, b_shape, *args, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace})
    with counter as fc:
        tree = build_tree(enc, b, agg)
        kv = S.TreeKV.from_tree(tree, ro.keys_values, (enc, enc))
        loss = sum((k * torch.randn_like(k)).sum() + (v * torch.randn_like(v)).sum()
                   for k, v in zip(kv.keys, kv.values, strict=True))
        loss.backward()
    counted = fc.get_total_flops()
    expected = load_breakdown().tree_train_flops(tree.shape, B, D, F_)
    assert counted == pytest.approx(expected, rel=0.01)


def test_breakdown_runs_and_writes_its_tables(tmp_path):
    mod = load_breakdown()
    argv = sys.argv
    sys.argv = ["breakdown.py", "--infer-len", "32", "--train-len", "32", "--batch", "2", "--repeats", "1",
                "--out", str(tmp_path)]
    try:
        mod.main()
    finally:
        sys.argv = argv
        torch.set_num_threads(1)
    res = json.loads((tmp_path / "breakdown.json").read_text())
    tr, inf = res["train"], res["infer"]
    assert inf["ratio"] == pytest.approx(inf["tca"]["ms"] / inf["ca"]["ms"])
    assert tr["ratio"] == pytest.approx(tr["tca"]["ms"] / tr["ca"]["ms"])
    parts = ["tree + node K/V", "search + read-out over S", "second read-out + head + loss"]
    assert tr["extra_ms"] == pytest.approx(tr["rest_ms"] + sum(tr[p]["ms"] for p in parts))
    assert all(tr[p]["ms"] > 0 for p in parts) and tr["tree_floor_ms"] > 0
    assert "Training step, L = 32" in (tmp_path / "breakdown.md").read_text()
