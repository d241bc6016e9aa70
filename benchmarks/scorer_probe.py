"""Where is the routing limit: in the node embeddings, or in the policy's score form? Probes on frozen weights.

A trained tca model routes a query at each level by the paper's policy: a dot product between the (projected)
query embedding and each child's (projected) node embedding, softmax over the children. This script freezes
a checkpoint's model (embedders, aggregator, every node embedding) and trains, by teacher forcing (the
cross-entropy of the right child at every level of the right path, :func:`tca_env.diagnostics.ancestors`),
new scorers that read only those frozen embeddings:

- ``bilinear``: the policy's own form, ``(A LN(q)) . (B c)`` with one head of ``--width``, fresh weights;
- ``mlp``: a two-layer perceptron on ``[LN(q), c, LN(q) * c]`` for each child on its own (what a node
  embedding tells about one box);
- ``pair``: a perceptron on the query and all b children at once (it may compare siblings, as a split does).

Each scorer's greedy descent is then measured on held-out sets (leaf hit: the query reached the leaf bucket
holding its key), beside the model's own policy on the same sets (those of ``benchmarks/search_report.py``).
If a scorer on the same embeddings routes far better than the policy, the embeddings hold the boxes and the
score form limits the search; if none does, the embeddings themselves lose them::

    python benchmarks/scorer_probe.py results/scale/saved/recall-tca-zoom15-restart/checkpoint.pt \
        --steps 3000 --json results/scale/probe/scorers-zoom15-restart.json

A diagnostic: the package's search keeps the paper's policy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from tca_env import search as S
from tca_env.checkpoint import load_predictor, task_of
from tca_env.diagnostics import ancestors
from tca_env.tasks import make_task

SCORERS = ("bilinear", "mlp", "pair")


class Scorer(nn.Module):
    """Scores ``[.., b]`` of the children ``c [.., b, D]`` for the query embedding ``q [.., D]``."""

    def __init__(self, kind: str, d: int, b: int, width: int):
        super().__init__()
        if kind not in SCORERS:
            raise ValueError(f"unknown scorer {kind!r}; choose from {SCORERS}")
        self.kind = kind
        self.norm = nn.LayerNorm(d)
        if kind == "bilinear":
            self.a, self.k = nn.Linear(d, width, bias=False), nn.Linear(d, width, bias=False)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(3 * d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, 1))
        else:
            self.net = nn.Sequential(nn.Linear((b + 1) * d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, b))

    def forward(self, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        q = self.norm(q)
        if self.kind == "bilinear":
            return (self.a(q).unsqueeze(-2) * self.k(c)).sum(-1) / self.a.out_features ** 0.5
        if self.kind == "mlp":
            qe = q.unsqueeze(-2).expand_as(c)
            return self.net(torch.cat([qe, c, qe * c], -1)).squeeze(-1)
        return self.net(torch.cat([q, c.flatten(-2)], -1))


def children(tree, node: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[B, M, b, D]`` and mask ``[B, M, b]`` of the children (at ``level``) of ``node [B, M]``: the
    search's own block gather (a node's children are b consecutive rows of the level below)."""
    b = tree.shape.b
    return S.gather_block(tree.nodes[level], node, b), S.gather_block(tree.node_mask[level], node, b)


def frozen_context(model, batch):
    """The tree and query embeddings of ``batch`` under ``model``, without gradients."""
    with torch.no_grad():
        ctx = model.prepare(batch)
    return ctx.tree, ctx.query_emb


def teacher_loss(scorer: Scorer, tree, q: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the right child at every level along the right path ``right [B, M, k+1]``."""
    b, losses = tree.shape.b, []
    for level in range(1, tree.shape.k + 1):
        c, mask = children(tree, right[..., level - 1], level)
        s = scorer(q, c).masked_fill(~mask, float("-inf"))
        losses.append(nn.functional.cross_entropy(s.flatten(0, 1), (right[..., level] % b).flatten()))
    return torch.stack(losses).mean()


@torch.no_grad()
def leaf_hit(scorer, tree, q: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` whether ``scorer``'s greedy descent reaches the right leaf ``right[..., -1]``."""
    node = torch.zeros_like(right[..., 0])
    for level in range(1, tree.shape.k + 1):
        c, mask = children(tree, node, level)
        node = node * tree.shape.b + scorer(q, c).masked_fill(~mask, float("-inf")).argmax(-1)
    return node == right[..., -1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="A tca checkpoint of the recall task (or another task with known target tokens).")
    p.add_argument("--scorers", nargs="+", choices=SCORERS, default=list(SCORERS), help="Scorers to train.")
    p.add_argument("--steps", type=int, default=3000, help="Teacher-forced steps per scorer (default 3000).")
    p.add_argument("--batch-size", type=int, default=16, help="Context sets per step (default 16).")
    p.add_argument("--width", type=int, default=256, help="Hidden width of the scorers (default 256).")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed to 0 (default 1e-3).")
    p.add_argument("--eval-every", type=int, default=500, help="Steps between held-out leaf-hit checks (default 500).")
    p.add_argument("--context-len", type=int, nargs="+", default=[1024, 4096, 65536],
                   help="Held-out context sizes for the final leaf hit (default 1024 4096 65536).")
    p.add_argument("--sets", type=int, default=4, help="Held-out sets per size (default 4).")
    p.add_argument("--seed", type=int, default=1, help="Seed of the training sets and the scorers' weights.")
    p.add_argument("--json", type=Path, default=None, help="Write the results here.")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    model, state = load_predictor(args.checkpoint, "cpu")
    if model.cfg.decoder != "tca":
        raise ValueError(f"{args.checkpoint} holds a {model.cfg.decoder!r} model; the probe needs a tca model")
    model.eval().requires_grad_(False)
    name, options = task_of(state)
    task = make_task(name, **options)

    def at_size(n: int):  # the task's held-out sets at n tokens (no size range)
        return make_task(name, **{**options, "context_len": n, "min_context_len": None})

    def held_out(n: int, sets: int):
        t = at_size(n)
        gen = torch.Generator().manual_seed(0)
        for _ in range(sets):
            batch = t.sample(1, gen, split=t.eval_splits[0])
            tree, q = frozen_context(model, batch)
            yield tree, q, ancestors(tree, t.target_tokens(batch))

    from search_report import evaluate as search_sets  # the model's own policy, beside this script

    results = {"checkpoint": args.checkpoint, "steps": args.steps, "width": args.width, "policy": {}, "scorers": {}}
    for n in args.context_len:
        report, _, _ = search_sets(model, at_size(n), args.sets)
        results["policy"][n] = report["leaf_hit"]
        print(f"policy (the model's own), N = {n:,}: leaf hit {100 * report['leaf_hit']:.1f}%", flush=True)
    val = next(held_out(args.context_len[0], 1))  # the first held-out set, for the progress lines
    d, b = val[1].shape[-1], val[0].shape.b
    for kind in args.scorers:
        torch.manual_seed(args.seed)
        scorer = Scorer(kind, d, b, args.width)
        opt = torch.optim.Adam(scorer.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
        gen, t0, curve = torch.Generator().manual_seed(args.seed), time.perf_counter(), []
        for step in range(1, args.steps + 1):
            batch = task.sample(args.batch_size, gen)
            tree, q = frozen_context(model, batch)
            loss = teacher_loss(scorer, tree, q, ancestors(tree, task.target_tokens(batch)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % args.eval_every == 0 or step == args.steps:
                hit = leaf_hit(scorer, val[0], val[1], val[2]).float().mean().item()
                curve.append({"step": step, "loss": loss.item(), "leaf_hit": hit})
                print(f"{kind} step {step}: loss {loss.item():.4f}, leaf hit at N = {args.context_len[0]:,} "
                      f"{100 * hit:.1f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
        final = {}
        for n in args.context_len:
            hits = [leaf_hit(scorer, tree, q, right).float().mean().item()
                    for tree, q, right in held_out(n, args.sets)]
            final[n] = sum(hits) / len(hits)
            print(f"{kind}, N = {n:,}: leaf hit {100 * final[n]:.1f}%", flush=True)
        results["scorers"][kind] = {"curve": curve, "leaf_hit": final, "seconds": time.perf_counter() - t0}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
