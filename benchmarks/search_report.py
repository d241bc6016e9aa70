"""Where a trained tca model's greedy search goes wrong, level by level, at any context size.

For tasks that know which context token answers each query (copy, recall), every query's greedy path is
checked against the ancestors of that token (:mod:`tca_env.diagnostics`): the share of queries whose leaf
bucket holds their token (leaf hit), the routing accuracy at each level among the queries still on the
right path, and the accuracy of the queries whose leaf is right and of the others. A model whose accuracy
on hits is high and whose leaf hit is low is limited by its search, not by its read-out. For the errors it
also gives how sure the policy was: the share of each level's errors made with the right child's
probability below 1% (confident errors, which REINFORCE hardly corrects), and for k-d trees (recall) how
many lie within 2% of the parent cell's extent from the split they got wrong, against all queries: errors
crowded at the splits mean the node embeddings place each split imprecisely rather than not at all.

    python benchmarks/search_report.py results/scale/saved/recall-tca-run/checkpoint.pt --context-len 1024 65536
    python benchmarks/search_report.py results/copy/saved/copy1024-tca-nodrop/checkpoint.pt --sets 16

``--key-box 1 0.5 0.25`` (recall) also reports each N with every set's keys shrunk into a random box of that
side: N keys in a box of side s are spaced like N / s^4 keys in the unit cube, as inside the subtrees of a
far larger context (those of 1,024 keys at N = 2^20 have side 2^-2.5 ~ 0.18). A model that routes by
coarse key features loses accuracy as the box shrinks at fixed N; one that generalises to large N must not.

Each context set is built and searched on its own (a batch of one), so N = 2^20 fits in a few GiB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tca_env import search as S
from tca_env.checkpoint import load_predictor, task_of
from tca_env.diagnostics import describe, right_child_probs, search_paths, search_report, split_margins
from tca_env.tasks import Batch, make_task


def report(ckpt: str, context_len: int | None = None, sets: int = 4, queries: int | None = None,
           seed: int = 0, key_box: float | None = None) -> dict:
    """The search report of checkpoint ``ckpt`` over ``sets`` fixed-seed context sets of its task, at
    ``context_len`` tokens where the task has that size option (recall), with ``queries`` per set;
    ``key_box``: recall keys shrunk into a random box of that side."""
    model, state = load_predictor(ckpt, "cpu")
    if model.cfg.decoder != "tca":
        raise ValueError(f"{ckpt} holds a {model.cfg.decoder!r} model; the search report needs a tca model")
    name, options = task_of(state)
    if context_len is not None:
        options.update(context_len=context_len, min_context_len=None)
    if queries is not None:
        options["num_queries"] = queries
    task = make_task(name, **options)
    if context_len is not None and getattr(task, "context_len", None) != context_len:
        raise ValueError(f"the {name!r} task has no context_len option: --context-len applies to recall")
    if key_box is not None and (name != "recall" or not 0 < key_box <= 1):
        raise ValueError(f"--key-box needs the recall task and a side in (0, 1]; got {name!r}, {key_box}")
    out, _, n = evaluate(model, task, sets, seed, key_box)
    box = {} if key_box is None else {"key_box": key_box}
    return {"checkpoint": ckpt, "task": name, "context_len": n, "sets": sets, "seed": seed, **box, **out}


def evaluate(model, task, sets: int, seed: int = 0, key_box: float | None = None) -> tuple[dict, torch.Tensor, int]:
    """The search report (with the confident errors) of ``model`` in eval mode over ``sets`` context sets of
    ``task`` drawn from ``seed``, each built and searched alone; also the policy's probability of the right
    child ``[sets, M, k]`` and the sets' N. Trees of the k-d ordering also report how near the splits the
    errors lie (:func:`~tca_env.diagnostics.split_margins`)."""
    kd = model.cfg.ordering == "kd"
    gen = torch.Generator().manual_seed(seed)
    box_gen = torch.Generator().manual_seed(seed + 1)  # its own stream: the same sets in every box
    rights, corrects, p_rights, margins, n = [], [], [], [], None
    model.eval()
    with torch.no_grad():
        for _ in range(sets):
            batch = task.sample(1, gen, split=task.eval_splits[0])  # held-out sets (recall: no zoom)
            if key_box is not None:  # the same keys in a random box of side key_box (queries stay keys)
                corner = torch.rand(1, 1, batch.xc.shape[-1], generator=box_gen) * (1 - key_box)
                batch = Batch(corner + key_box * batch.xc, batch.yc, corner + key_box * batch.xt, batch.yt)
            target = task.target_tokens(batch)
            if target is None:
                raise ValueError(f"the {task.name!r} task does not say which context token answers a query")
            ctx = model.prepare(batch)  # keeps the tree (its token order) for search_paths
            # One greedy search serves both the prediction and the path check.
            attn, path = S.greedy_readout(ctx.kv, ctx.q, with_path=True)
            pred = model.finish_head(ctx.query_emb, attn)
            rights.append(search_paths(ctx, target, path)[0])
            corrects.append(pred.argmax(-1) == batch.yt)
            p_rights.append(right_child_probs(ctx, target))
            if kd:
                margins.append(split_margins(ctx.tree, batch.xc, target, batch.xt))
            n = batch.N
            del ctx
    p_right = torch.cat(p_rights)
    margin = torch.cat(margins) if kd else None
    return search_report(torch.cat(rights), torch.cat(corrects), p_right, margin), p_right, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="A tca checkpoint of a task with known target tokens (copy, recall).")
    p.add_argument("--context-len", type=int, nargs="*", default=None,
                   help="Context sizes N to report (recall); default: the size the task was trained at.")
    p.add_argument("--sets", type=int, default=4, help="Context sets per size (fixed seed).")
    p.add_argument("--queries", type=int, default=None,
                   help="Queries per set (recall's num_queries; default: as trained).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the context sets.")
    p.add_argument("--key-box", type=float, nargs="*", default=None,
                   help="Recall: also report every N with the keys shrunk into a random box of each side given "
                        "(0 < side <= 1; 1 is the plain task): how the search copes with finer key spacings.")
    p.add_argument("--json", default=None, help="Also write the reports to this JSON file.")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [report(args.checkpoint, n, args.sets, args.queries, args.seed, box)
            for n in (args.context_len or [None]) for box in (args.key_box or [None])]
    for r in rows:
        print(f"N = {r['context_len']:,}" + (f", keys in a box of side {r['key_box']}" if "key_box" in r else ""))
        print("\n".join("  " + line for line in describe(r)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
