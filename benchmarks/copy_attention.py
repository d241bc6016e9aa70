"""Where a copy-task model's full cross attention looks: per block of query positions, the greedy accuracy
and each head's attention weight on the right context token, and the most common wrong offsets.

Query j of the copy task must read context token L/2 - 1 - j. A model whose position matching has not
converged attends elsewhere for whole blocks of queries; this script shows where. It reads the attention of
the full cross attention over all context tokens (the "ca" decoder, or a tca model's L_CA branch).

For a tca model it also follows the greedy search: how often the leaf it reaches holds the right token,
at which level a wrong path first leaves the right token's ancestors, and the accuracy of the queries
whose leaf is right and of those whose leaf is wrong (the read-out can still be right through a node).

    python benchmarks/copy_attention.py results/copy/saved/copy1024-ca-nodrop/checkpoint.pt
    python benchmarks/copy_attention.py CKPT --sequences 64 --block 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tca_env.checkpoint import load_predictor, task_of
from tca_env.diagnostics import describe, search_paths, search_report
from tca_env.tasks import make_task


def analyse(ckpt: str, sequences: int = 64, block: int = 32, seed: int = 123) -> dict:
    model, state = load_predictor(ckpt)
    name, options = task_of(state)
    if name != "copy":
        raise ValueError(f"{ckpt} was trained on the {name!r} task, not copy")
    task = make_task(name, **options)
    batch = task.sample(sequences, torch.Generator().manual_seed(seed))
    n = task.n
    if n % block:
        raise ValueError(f"--block {block} does not divide the {n} query positions")
    target = n - 1 - torch.arange(n)  # the context position each query must read
    with torch.no_grad():
        ctx = model.prepare(batch, full=True)
        correct = (model.predict(batch).argmax(-1) == batch.yt).float()  # [B, M]
        k, _ = ctx.enc_kv
        weights = torch.einsum("bmhd,bnhd->bmhn", ctx.q, k).softmax(-1)  # [B, M, H, N]
    on_target = weights[:, torch.arange(n), :, target].mean(1)  # [M, H]
    offsets = weights.argmax(-1) - target.view(1, n, 1)  # [B, M, H]
    blocks = n // block
    res = {"checkpoint": ckpt, "seq_len": task.seq_len, "sequences": sequences, "block": block,
           "accuracy": correct.mean().item(),
           "accuracy_per_block": correct.mean(0).view(blocks, block).mean(1).tolist(),
           "weight_on_target_per_block": [on_target[:, h].view(blocks, block).mean(1).tolist()
                                          for h in range(on_target.shape[1])],
           "wrong_offsets": []}
    for h in range(offsets.shape[-1]):
        o = offsets[..., h]
        vals, counts = torch.unique(o[o != 0], return_counts=True)
        top = counts.argsort(descending=True)[:8]
        res["wrong_offsets"].append({"head": h, "share_on_target": (o == 0).float().mean().item(),
                                     "top": [[int(vals[i]), int(counts[i])] for i in top]})
    if model.cfg.decoder == "tca":
        res["search"] = search_analysis(ctx, target, correct, block)
    return res


def search_analysis(ctx, target: torch.Tensor, correct: torch.Tensor, block: int) -> dict:
    """Where the greedy search of every query goes against the leaf that holds its right token
    (:func:`tca_env.diagnostics.search_report`), with the leaf-hit rate per block of query positions."""
    right, _ = search_paths(ctx, target)
    hit = right.all(-1)  # [B, M]
    blocks = hit.shape[1] // block
    return {**search_report(right, correct),
            "leaf_hit_per_block": hit.float().mean(0).view(blocks, block).mean(1).tolist()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="A copy-task checkpoint (tca train ... --run-dir D writes D/checkpoint.pt).")
    p.add_argument("--sequences", type=int, default=64, help="Held-out sequences to analyse (fixed seed).")
    p.add_argument("--block", type=int, default=32, help="Query positions per block in the per-block rows.")
    p.add_argument("--seed", type=int, default=123, help="Seed of the sequences.")
    p.add_argument("--json", default=None, help="Also write the analysis to this JSON file.")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = analyse(args.checkpoint, args.sequences, args.block, args.seed)
    print(f"accuracy {100 * res['accuracy']:.2f}% over {args.sequences} sequences, L = {res['seq_len']}")
    print("accuracy per block:", " ".join(f"{100 * a:.0f}" for a in res["accuracy_per_block"]))
    for h, row in enumerate(res["weight_on_target_per_block"]):
        print(f"head {h} weight on the right token per block:", " ".join(f"{w:.2f}" for w in row))
    for w in res["wrong_offsets"]:
        print(f"head {w['head']}: argmax on the right token {100 * w['share_on_target']:.1f}%; most common wrong "
              f"offsets (offset, count): {w['top']}")
    if "search" in res:
        print("\n".join(describe(res["search"])))
        print("leaf hit per block:", " ".join(f"{100 * a:.0f}" for a in res["search"]["leaf_hit_per_block"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
