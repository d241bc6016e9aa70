"""The search diagnostics (tca_env.diagnostics, benchmarks/copy_attention.py, benchmarks/search_report.py)
against a brute force over each query's greedy path and the tokens under every node it visits."""

import json
import sys
from pathlib import Path

import pytest
import torch

from tca_env import search as S
from tca_env.diagnostics import CONFIDENT, NEAR_SPLIT, right_child_probs, search_paths, search_report, split_margins
from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import make_task
from tca_env.tree import TreeShape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from copy_attention import search_analysis  # noqa: E402
from search_report import main as search_report_main  # noqa: E402

SMALL = dict(d_model=16, nhead=2, dim_ff=32, emb_depth=2)


def brute_force(ctx, target):
    """Per query: the levels at which its greedy path visits a node whose tokens miss the needed one."""
    _, path = S.greedy_readout(ctx.kv, ctx.q, with_path=True)
    shape, slots = ctx.tree.shape, ctx.tree.token_index  # slots [B, P*b^k]: the context token in each slot
    B, M = target.shape
    wrong = [[[lv for lv in range(1, shape.k + 1)
               if target[i, j] not in slots[i, (w := shape.P * shape.b ** (shape.k - lv)) * path[i, j, lv]:
                                             w * (path[i, j, lv] + 1)]]
              for j in range(M)] for i in range(B)]
    return wrong, shape.k


def expected_report(wrong, k, correct):
    flat = [w for row in wrong for w in row]
    hits = torch.tensor([not w for w in flat])
    routing = []
    for lv in range(1, k + 1):
        reach = [w for w in flat if not w or w[0] >= lv]  # right at every level above lv
        routing.append(sum(1 for w in reach if not w or w[0] > lv) / len(reach) if reach else float("nan"))
    c = correct.flatten().float()
    return {"leaf_hit": hits.float().mean().item(), "routing_per_level": routing,
            "first_wrong_level_share": [sum(1 for w in flat if w and w[0] == lv) / len(flat)
                                        for lv in range(1, k + 1)],
            "accuracy": c.mean().item(),
            "accuracy_if_hit": c[hits].mean().item() if hits.any() else float("nan"),
            "accuracy_if_missed": c[~hits].mean().item() if (~hits).any() else float("nan")}, hits


@pytest.mark.parametrize("task_name,size,b", [("copy", 64, 2), ("copy", 20, 3), ("copy", 26, 2),
                                              ("recall", 37, 2), ("recall", 100, 3), ("recall", 64, 4)])
def test_search_report_matches_brute_force(task_name, size, b):
    """Leaf hit, per-level routing, first wrong level and the accuracies, for full and padded trees (N not a
    power of b), against the tokens under every node each query visits."""
    task = (make_task("copy", seq_len=size) if task_name == "copy"
            else make_task("recall", context_len=size, num_queries=25))
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, encoder="constant", branch=b, **SMALL)).eval()
    batch = task.sample(3, torch.Generator().manual_seed(1))
    target = task.target_tokens(batch)
    correct = torch.rand(target.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    with torch.no_grad():
        ctx = model.prepare(batch)
        right, path = search_paths(ctx, target)
        res = search_report(right, correct)
        wrong, k = brute_force(ctx, target)
    exp, hits = expected_report(wrong, k, correct)
    assert res["levels"] == k and right.shape == path.shape == (3, target.shape[1], k + 1)
    assert right[..., 0].all()  # the root holds every token
    for key, value in exp.items():
        assert res[key] == pytest.approx(value, nan_ok=True), key
    assert 0 < res["leaf_hit"] < 1  # an untrained search hits some leaves and misses others


@pytest.mark.parametrize("task_name,size,b", [("copy", 64, 2), ("recall", 100, 3), ("recall", 37, 2)])
def test_right_child_probs_and_confident_errors_match_brute_force(task_name, size, b):
    """The policy's probability of the right child per level, recomputed per query from the nodes' own
    embeddings (each head's softmax over the real children, averaged over heads), and the report's share of
    confident errors and median p(right) at each query's first wrong level."""
    task = (make_task("copy", seq_len=size) if task_name == "copy"
            else make_task("recall", context_len=size, num_queries=25))
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, encoder="constant", branch=b, **SMALL)).eval()
    with torch.no_grad():
        model.readout.attn.q.weight.mul_(40.0)  # sharp scores: an untrained policy that errs confidently
        batch = task.sample(2, torch.Generator().manual_seed(1))
        target = task.target_tokens(batch)
        ctx = model.prepare(batch)
        p = right_child_probs(ctx, target)
        right, _ = search_paths(ctx, target)
        res = search_report(right, None, p)
        tree, shape = ctx.tree, ctx.tree.shape
        slots = tree.token_index
        B, M = target.shape
        expected = torch.empty(B, M, shape.k)
        for i in range(B):
            for j in range(M):
                slot = int((slots[i] == target[i, j]).nonzero())
                for lv in range(1, shape.k + 1):
                    node = slot // (shape.P * shape.b ** (shape.k - lv))  # the right node at level lv
                    kids = [node // b * b + c for c in range(b)]
                    real = [c for c in kids if tree.node_mask[lv][i, c]]
                    keys, _ = model.readout.keys_values(tree.nodes[lv][i, real])  # [c, H, dh]
                    w = (keys * ctx.q[i, j]).sum(-1).softmax(0)  # [c, H]
                    expected[i, j, lv - 1] = w[real.index(node)].mean()
    torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
    wrong, k = brute_force(ctx, target)
    first = torch.tensor([w[0] if w else k + 1 for row in wrong for w in row])
    pf = p.reshape(-1, k)
    for lv in range(1, k + 1):
        at = pf[first == lv, lv - 1]
        conf, med = res["confident_errors_per_level"][lv - 1], res["p_right_when_wrong_per_level"][lv - 1]
        if at.numel():
            assert conf == pytest.approx((at < CONFIDENT).float().mean().item())
            assert med == pytest.approx(at.median().item())
        else:
            assert conf != conf and med != med  # NaN: no query errs first at this level
    assert (pf[first <= k] < CONFIDENT).any()  # the sharpened policy does err confidently somewhere


def test_copy_attention_search_analysis_per_block():
    """The copy diagnostic adds the leaf hit per block of query positions to the report."""
    task = make_task("copy", seq_len=64)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, encoder="constant", **SMALL)).eval()
    batch = task.sample(3, torch.Generator().manual_seed(1))
    n = task.n
    target = n - 1 - torch.arange(n)  # the copy task's rule, independent of target_tokens
    assert torch.equal(task.target_tokens(batch), target.expand(3, n))
    correct = (torch.rand(3, n, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    with torch.no_grad():
        ctx = model.prepare(batch, full=True)
        res = search_analysis(ctx, target, correct, block=4)
        wrong, k = brute_force(ctx, target.expand(3, n))
    _, hits = expected_report(wrong, k, correct)
    assert res["leaf_hit_per_block"] == pytest.approx(hits.view(3, n).float().mean(0).view(-1, 4).mean(1).tolist())


def test_search_paths_needs_the_tree_and_a_matching_target():
    task = make_task("recall", context_len=40, num_queries=8)
    model = ReTreever(ModelConfig.for_task(task, encoder="constant", **SMALL)).eval()
    batch = task.sample(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lean = model.prepare(batch, lean=True)
        with pytest.raises(ValueError, match="lean=False"):
            search_paths(lean, task.target_tokens(batch))
        with pytest.raises(ValueError, match="target must be"):
            search_paths(model.prepare(batch), task.target_tokens(batch)[:, :3])


def small_recall_checkpoint(run: Path, context_len: int, steps: int) -> Path:
    """A tiny tca recall model trained ``steps`` steps through the CLI; its checkpoint's path."""
    from training.cli import main as tca_main

    assert tca_main(["train", "--task", "recall", "--context-len", str(context_len), "--task-args",
                     '{"num_queries": 16}', "--decoder", "tca", "--steps", str(steps), "--batch-size", "2",
                     "--eval-every", str(steps), "--eval-size", "2", "--eval-batch", "2", "--d-model", "16",
                     "--nhead", "2", "--dim-ff", "32", "--progress", "false", "--run-dir", str(run)]) == 0
    return run / "checkpoint.pt"


def test_search_report_script_on_a_saved_recall_model(tmp_path):
    """The script reads a checkpoint, evaluates at another context size, and its JSON holds the report."""
    ckpt = small_recall_checkpoint(tmp_path / "run", 64, 2)
    out = tmp_path / "report.json"
    assert search_report_main([str(ckpt), "--context-len", "100", "--sets", "2",
                               "--queries", "10", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["context_len"] == 100 and row["queries"] == 20 and row["task"] == "recall"
    assert row["levels"] == len(row["routing_per_level"]) == len(row["first_wrong_level_share"])
    assert 0 <= row["leaf_hit"] <= 1 and 0 <= row["accuracy"] <= 1
    # --key-box: the same sets per side; side 1 is the plain task, a box of side 1e-3 other keys and answers
    assert search_report_main([str(ckpt), "--context-len", "100", "--sets", "2", "--queries", "10",
                               "--key-box", "1", "0.001", "--json", str(out)]) == 0
    plain, tiny = json.loads(out.read_text())
    assert plain["key_box"] == 1 and tiny["key_box"] == 0.001
    assert {k: v for k, v in plain.items() if k != "key_box"} == row
    assert tiny["queries"] == 20 and tiny["routing_per_level"] != row["routing_per_level"]
    with pytest.raises(ValueError, match="key-box"):
        search_report_main([str(ckpt), "--key-box", "2"])


def test_routing_probe_teacher_forcing_raises_the_right_paths_probability(tmp_path):
    """benchmarks/routing_probe.py: told the right child at every level, the search's log-probability of the
    right path rises; the reports are those of search_report, at the steps asked for."""
    from routing_probe import main as probe_main

    ckpt = small_recall_checkpoint(tmp_path / "run", 32, 1)
    out = tmp_path / "probe.json"
    assert probe_main([str(ckpt), "--bptt", "true", "--steps", "40", "--eval-every", "20",
                       "--batch-size", "4", "--lr", "0.01", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert all(r["levels"] == 4 == len(r["routing_per_level"]) for r in rows)  # N = 32, b = 2: P = 2, k = 4
    assert rows[-1]["right_path_log_prob"] > rows[0]["right_path_log_prob"] + 0.5


@pytest.mark.parametrize("n,b", [(64, 2), (37, 2), (100, 3)])
def test_split_margins_against_the_cells_of_the_kd_tree(n, b):
    """split_margins against a brute force over the real tokens under every node: the query's distance to the
    midpoint between neighbouring children's coordinates along the level's split axis, over the parent's extent;
    and search_report's near-split shares from it."""
    task = make_task("recall", context_len=n, num_queries=12)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, branch=b, **SMALL)).eval()
    batch = task.sample(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ctx = model.prepare(batch)
    target = task.target_tokens(batch)
    margin = split_margins(ctx.tree, batch.xc, target, batch.xt)
    shape, slots, real = ctx.tree.shape, ctx.tree.token_index, ctx.tree.token_mask
    assert margin.shape == (2, 12, shape.k)

    def coords_under(i, lv, node, c):
        w = shape.P * b ** (shape.k - lv)
        sl = [t for t in range(w * node, w * (node + 1)) if real[i, t]]
        return [float(batch.xc[i, slots[i, t], c]) for t in sl]

    for i in range(2):
        for j in range(12):
            slot = int((slots[i] == target[i, j]).logical_and(real[i]).nonzero()[0])
            for lv in range(1, shape.k + 1):
                c = (lv - 1) % batch.xc.shape[-1]
                child = slot // (shape.P * b ** (shape.k - lv))
                parent_first = child - child % b
                cells = [coords_under(i, lv, parent_first + t, c) for t in range(b)]
                ext = max(max(x) for x in cells) - min(min(x) for x in cells)
                xq, pos = float(batch.xt[i, j, c]), child % b
                bounds = [(max(cells[t - 1]) + min(cells[t])) / 2 for t in (pos,) if t > 0] + \
                         [(max(cells[t]) + min(cells[t + 1])) / 2 for t in (pos,) if t < b - 1]
                assert max(cells[pos - 1]) <= min(cells[pos]) if pos > 0 else True  # sorted children
                expect = min(abs(xq - x) for x in bounds) / ext
                assert abs(float(margin[i, j, lv - 1]) - expect) < 1e-5, (i, j, lv)
    right, _ = search_paths(ctx, target)
    rep = search_report(right, None, None, margin)
    first_wrong = torch.where(right, shape.k + 1, torch.arange(shape.k + 1)).amin(-1)
    above = right.cummin(-1).values
    for lv in range(1, shape.k + 1):
        reach = margin[..., lv - 1][above[..., lv - 1]]
        got = rep["near_split_all_per_level"][lv - 1]
        assert (got != got) if reach.numel() == 0 else got == pytest.approx(float((reach < NEAR_SPLIT).float().mean()))
        err = margin[..., lv - 1][first_wrong == lv]
        got = rep["near_split_errors_per_level"][lv - 1]
        assert (got != got) if err.numel() == 0 else got == pytest.approx(float((err < NEAR_SPLIT).float().mean()))


@pytest.mark.parametrize("n", [64, 100, 257, 1024])
def test_reference_routers_box_rule_is_exact_and_centroid_is_not(n):
    """benchmarks/reference_routers.py: the nearest-bounding-box rule reaches every key's own leaf (k-d splits put
    a key outside its sibling's box), the nearest-centroid rule does not (some key lies nearer its sibling's
    mean); each leaf holds at most P keys (padded trees included)."""
    from reference_routers import route

    keys = torch.rand(n, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    q = torch.arange(n)
    reached, target = route(keys, q, "box")
    assert torch.equal(reached, target)
    assert int(torch.bincount(target).max()) <= TreeShape(n, 2).P
    reached_c, target_c = route(keys, q, "centroid")
    assert torch.equal(target_c, target) and 0.3 < float((reached_c == target).double().mean()) < 1.0
    with pytest.raises(ValueError, match="unknown rule"):
        route(keys, q, "nearest")


def test_reference_routers_noisy_boxes_lose_queries_near_splits():
    """--box-noise: bounds known to a relative precision route fewer queries right the coarser they are, and a
    precision far below the gaps between keys changes nothing."""
    from reference_routers import leaf_hit

    exact = leaf_hit(512, "box", sets=2, queries=512, seed=0)
    hits = [leaf_hit(512, "box", sets=2, queries=512, seed=0, noise=e) for e in (1e-12, 1e-2, 1e-1)]
    assert exact == 1.0 and hits[0] == 1.0
    assert 1.0 > hits[1] > hits[2]
    with pytest.raises(ValueError, match="'box' rule only"):
        leaf_hit(64, "centroid", sets=1, queries=64, seed=0, noise=0.1)


def test_scorer_probe_descends_and_scores_as_the_models_own_policy(tmp_path):
    """benchmarks/scorer_probe.py: with the model's own policy as the scorer, its children gather, greedy descent
    and teacher-forced loss give the package's search (leaf hits of search_paths, -log of right_child_probs);
    the script trains every scorer form and writes their leaf hits."""
    from scorer_probe import leaf_hit, teacher_loss
    from scorer_probe import main as scorer_main

    from tca_env.diagnostics import ancestors
    from tca_env.search import observed_log_probs

    task = make_task("recall", context_len=40, num_queries=64)  # 40 tokens: a padded tree of 5 levels
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, **SMALL)).eval()
    batch = task.sample(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = model.prepare(batch)
        target = task.target_tokens(batch)
        right = ancestors(ctx.tree, target)

        def policy(q, c):  # q [B, M, D], c [B, M, b, D] -> log pi [B, M, b]
            return observed_log_probs(model.readout, q.flatten(0, 1), c.flatten(0, 1), None).view(c.shape[:-1])

        hits = leaf_hit(policy, ctx.tree, ctx.query_emb, right)
        assert torch.equal(hits, search_paths(ctx, target)[0].all(-1))
        assert 0 < hits.float().mean() < 1  # an untrained model: some right, some wrong
        expected = -right_child_probs(ctx, target).log().mean()
        assert torch.allclose(teacher_loss(policy, ctx.tree, ctx.query_emb, right), expected, atol=1e-5)
    ckpt = small_recall_checkpoint(tmp_path / "run", 32, 1)
    out = tmp_path / "scorers.json"
    assert scorer_main([str(ckpt), "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--width", "16",
                        "--context-len", "32", "64", "--sets", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["scorers"]) == {"bilinear", "mlp", "pair"} and set(res["policy"]) == {"32", "64"}
    for r in res["scorers"].values():
        assert [c["step"] for c in r["curve"]] == [2, 4] and all(0 <= h <= 1 for h in r["leaf_hit"].values())
