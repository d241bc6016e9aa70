"""The copy diagnostic's search analysis (benchmarks/copy_attention.py) against a brute force over each
query's path and the tokens under every node it visits."""

import sys
from pathlib import Path

import pytest
import torch

from tca_env import search as S
from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import make_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from copy_attention import search_analysis  # noqa: E402


@pytest.mark.parametrize("seq_len,b", [(64, 2), (20, 3), (26, 2)])  # 32 tokens; 10 and 13 (padded trees)
def test_search_analysis_matches_brute_force(seq_len, b):
    task = make_task("copy", seq_len=seq_len)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, encoder="constant", branch=b, d_model=16, nhead=2, dim_ff=32,
                                           emb_depth=2)).eval()
    batch = task.sample(3, torch.Generator().manual_seed(1))
    n = task.n
    target = n - 1 - torch.arange(n)
    correct = torch.rand(3, n, generator=torch.Generator().manual_seed(2)) < 0.5
    with torch.no_grad():
        ctx = model.prepare(batch, full=True)
        res = search_analysis(ctx, target, correct.float(), block=1)
        _, path = S.greedy_readout(ctx.kv, ctx.q, with_path=True)
    shape, slots = ctx.tree.shape, ctx.tree.token_index
    hits, first = [], []
    for i in range(3):
        for j in range(n):
            wrong = [lv for lv in range(1, shape.k + 1)  # the node visited at level lv misses the right token
                     if target[j] not in slots[i, (w := shape.P * b ** (shape.k - lv)) * path[i, j, lv]:
                                                w * (path[i, j, lv] + 1)]]
            hits.append(not wrong)
            first.append(wrong[0] if wrong else None)
    hits = torch.tensor(hits)
    assert res["leaf_hit"] == pytest.approx(hits.float().mean().item())
    assert res["leaf_hit_per_block"] == pytest.approx(hits.view(3, n).float().mean(0).tolist())
    assert res["first_wrong_level_share"] == pytest.approx([first.count(lv) / len(first)
                                                             for lv in range(1, shape.k + 1)])
    flat = correct.flatten()
    if hits.any():
        assert res["accuracy_if_hit"] == pytest.approx(flat[hits].float().mean().item())
    if (~hits).any():
        assert res["accuracy_if_missed"] == pytest.approx(flat[~hits].float().mean().item())
    assert 0 < res["leaf_hit"] < 1 or seq_len != 64  # an untrained search hits some leaves and misses others
