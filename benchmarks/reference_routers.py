"""How well can a search that sees only each child's own tokens route the recall task? Two fixed rules.

The recall task's trees are k-d trees over the keys, and a query is one of the keys, so at every level exactly
one child holds it. A tca search scores a child by the attention of the query over the child's embedding, an
aggregate of the tokens below it (bottom-up: a node knows nothing of its sibling). This script routes every
query greedily, root to leaf, with two rules that are also bottom-up, computed exactly from the keys (no model):

* ``centroid``: go to the child whose keys' mean is nearest the query (what a similarity between the query and
  a summary of the child's contents does);
* ``box``: go to the child whose keys' bounding box is nearest the query (distance 0 inside it). A query lies
  in its own child's box, and the k-d split puts it outside the sibling's box along the split coordinate, so
  this rule is exact: a node's extent per coordinate is all a search needs to know.

Leaf hit (the share of queries whose greedy path ends in the leaf holding their key) per N, on sets drawn as
the recall task's evaluation sets (keys uniform in the unit cube, 4 coordinates, b = 2, two keys per leaf):

    python benchmarks/reference_routers.py --context-len 1024 4096 65536 1048576 --json results/scale/routers.json

Compare with a trained model's leaf hit from ``benchmarks/search_report.py`` at the same N. ``--box-noise``
adds the box rule with every bound off by Gaussian noise of a given size relative to the node's extent: how
precisely a learned node summary must hold its box for a given leaf hit.

    python benchmarks/reference_routers.py --context-len 1024 4096 65536 1048576 --sets 4 \
        --box-noise 0.1 0.03 0.01 0.003 0.001 0.0003 0.0001 --json results/scale/routers-noise.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tca_env.tree import TreeShape, order_tokens

RULES = ("centroid", "box")


def route(keys: torch.Tensor, queries: torch.Tensor, rule: str, b: int = 2, noise: float = 0.0,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy paths of ``queries`` (indices into ``keys [N, d]``) through the k-d tree of ``keys``.

    ``noise`` (rule ``box``): each node's bounds are known only up to Gaussian noise of this standard deviation
    relative to the node's extent per coordinate (one draw per node and bound, shared by every query), as a
    learned summary that holds a node's extent to a relative precision would know them.

    Returns the leaf reached ``[Q]`` and the leaf that holds each query's key ``[Q]``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    if noise < 0 or (noise > 0 and rule != "box"):
        raise ValueError(f"noise must be >= 0 and applies to the 'box' rule only; got {noise} with {rule!r}")
    n, d = keys.shape
    shape = TreeShape(n, b)
    perm = order_tokens(keys.unsqueeze(0), n, b, "kd")[0]  # slot order: perm[t] is the t-th ordered key
    slot = shape.slot_index()  # [N] padded slot of the t-th ordered key
    ordered = keys[perm]
    where = torch.empty(n, dtype=torch.long)
    where[perm] = slot  # slot of each key
    xq = keys[queries]  # [Q, d]
    node = torch.zeros(len(queries), dtype=torch.long)
    for level in range(1, shape.k + 1):
        owner = slot // (shape.P * b ** (shape.k - level))  # node at this level of each ordered key
        m = b**level
        count = torch.zeros(m, dtype=keys.dtype).index_add_(0, owner, torch.ones(n, dtype=keys.dtype))
        children = node.unsqueeze(1) * b + torch.arange(b)  # [Q, b]
        if rule == "centroid":
            mean = torch.zeros(m, d, dtype=keys.dtype).index_add_(0, owner, ordered) / count.clamp_min(1).unsqueeze(1)
            score = -(xq.unsqueeze(1) - mean[children]).pow(2).sum(-1)
        else:
            idx = owner.unsqueeze(1).expand(n, d)
            lo = torch.full((m, d), float("inf"), dtype=keys.dtype).scatter_reduce(0, idx, ordered, "amin")
            hi = torch.full((m, d), float("-inf"), dtype=keys.dtype).scatter_reduce(0, idx, ordered, "amax")
            if noise > 0:
                width = (hi - lo).nan_to_num(0.0, 0.0, 0.0)  # empty (padded) nodes: inf - inf
                lo = lo + noise * width * torch.randn(lo.shape, generator=generator, dtype=keys.dtype)
                hi = hi + noise * width * torch.randn(hi.shape, generator=generator, dtype=keys.dtype)
            x = xq.unsqueeze(1)
            score = -((lo[children] - x).clamp_min(0) + (x - hi[children]).clamp_min(0)).pow(2).sum(-1)
        score = score.masked_fill(count[children] == 0, float("-inf"))  # padded (empty) children
        node = children.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
    return node, where[queries] // shape.P


def leaf_hit(n: int, rule: str, sets: int, queries: int, seed: int, d: int = 4, noise: float = 0.0) -> float:
    """Mean leaf hit of ``rule`` over ``sets`` random sets of ``n`` keys (``queries`` keys asked per set)."""
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)  # its own stream: every noise level sees the same sets
    hits = []
    for _ in range(sets):
        keys = torch.rand(n, d, generator=gen, dtype=torch.float64)
        q = torch.randperm(n, generator=gen)[:queries]
        reached, target = route(keys, q, rule, noise=noise, generator=noise_gen)
        hits.append((reached == target).double().mean().item())
    return sum(hits) / len(hits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context-len", type=int, nargs="+", default=[1024, 4096, 65536],
                   help="Context sizes N to route over (keys uniform in [0, 1)^4).")
    p.add_argument("--sets", type=int, default=4, help="Random key sets per N.")
    p.add_argument("--queries", type=int, default=16384, help="Queries (keys of the set) per set, at most N.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the key sets and of the queries asked.")
    p.add_argument("--box-noise", type=float, nargs="*", default=[],
                   help="Also route by bounding boxes known to these relative precisions (the standard deviation "
                   "of each bound's error over the node's extent, e.g. 0.01 0.001): how precisely a learned node "
                   "summary must hold a node's extent for a given leaf hit.")
    p.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = p.parse_args(argv)
    if any(e < 0 for e in args.box_noise):
        raise SystemExit(f"--box-noise must be >= 0; got {args.box_noise}")
    torch.set_num_threads(1)
    rows = []
    for n in args.context_len:
        q = min(args.queries, n)
        row = {"context_len": n, **{r: leaf_hit(n, r, args.sets, q, args.seed) for r in RULES}}
        row["box_noise"] = {str(e): leaf_hit(n, "box", args.sets, q, args.seed, noise=e) for e in args.box_noise}
        rows.append(row)
        noisy = "".join(f", box to {float(e):g}: {100 * h:.2f}%" for e, h in row["box_noise"].items())
        print(f"N = {n:,}: leaf hit, nearest centroid {100 * row['centroid']:.2f}%, "
              f"nearest bounding box {100 * row['box']:.2f}%{noisy}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
