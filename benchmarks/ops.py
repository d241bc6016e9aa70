"""Count the ATen ops one call launches in eager PyTorch: a proxy for kernel launches on a GPU, where each
small op costs a launch (why the paper measured TCA 5.6x slower than cross attention at L = 512).

The copy-task model (D = 64, 4 heads, feed-forward 128, embedder depth 4, no encoder), batch 4, CPU,
counted with torch.profiler. Two counts per call:

* ``all``: every ``aten::`` event the profiler records, nested ones included (``aten::linear`` and the
  ``aten::t`` / ``aten::addmm`` it calls count 3): the counting of the package's op-count targets.
* ``compute``: the events that do work, without views and metadata-only ops (view, reshape, t, transpose,
  as_strided, expand, select, slice, unsqueeze, ...) and without the composite op that merely dispatches
  to another (``linear``, ``matmul``, ``layer_norm``, ``softmax``, ...): close to the kernels a GPU launches.

    python benchmarks/ops.py                  # L = 256, 1024, 4096; b = 2, 4; writes results/ops/ops.{json,md}
    python benchmarks/ops.py --lengths 256 --out /tmp/ops

Counts are deterministic (no timing): they depend on the code path alone, not on the machine.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import make_task

#: ops that move no data (views, metadata) or only dispatch to another aten op counted on its own
NOT_COMPUTE = frozenset(f"aten::{n}" for n in (
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "expand", "select", "slice", "narrow",
    "unsqueeze", "squeeze", "unflatten", "flatten", "alias", "detach", "permute", "split", "chunk",
    "resolve_conj", "resolve_neg", "empty", "empty_strided", "empty_like", "new_empty", "lift_fresh", "to",
    "linear", "matmul", "layer_norm", "softmax", "dropout", "unbind", "contiguous", "expand_as", "view_as",
    "result_type", "is_nonzero", "item", "_local_scalar_dense", "size", "stride", "numel", "split_with_sizes",
))


def count(model: ReTreever, batch, what: str) -> dict[str, int]:
    """ATen events of one greedy ``predict`` (``what="predict"``) or one training forward + backward."""
    def call():
        if what == "predict":
            model.eval()
            model.predict(batch)
        else:
            model.train()
            model.zero_grad()
            model(batch, generator=torch.Generator().manual_seed(0)).loss.backward()

    call()  # warm-up: lazy initialisations are not part of a call
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
    return {"all": len(names), "compute": sum(1 for n in names if n not in NOT_COMPUTE),
            "top": dict(Counter(names).most_common(8))}


def run(lengths: list[int], branches: list[int], batch: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for L in lengths:
        task = make_task("copy", seq_len=L)
        data = task.sample(batch, torch.Generator().manual_seed(0))
        for decoder, bs in (("tca", branches), ("ca", [2])):
            for b in bs:
                torch.manual_seed(0)
                model = ReTreever(ModelConfig.for_task(task, decoder=decoder, encoder="constant", branch=b,
                                                       dropout=0.1))
                shape = model.tree_shape(task.max_context)
                for what in ("predict", "train"):
                    c = count(model, data, what)
                    rows.append({"decoder": decoder, "seq_len": L, "b": b, "k": shape.k, "P": shape.P, "what": what,
                                 "all": c["all"], "compute": c["compute"], "top": c["top"]})
                    print(f"{decoder:4s} L={L:5d} b={b} k={shape.k:2d} {what:8s} all {c['all']:6d} "
                          f"compute {c['compute']:6d}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| decoder | L | b | k | P | predict: all | predict: compute | train step: all | train step: compute |",
           "|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["decoder"], r["seq_len"], r["b"], r["what"]): r for r in rows}
    for (dec, L, b, what), r in keyed.items():
        if what != "predict":
            continue
        t = keyed[(dec, L, b, "train")]
        out.append(f"| {dec} | {L:,} | {b} | {r['k']} | {r['P']} | {r['all']:,} | {r['compute']:,} | "
                   f"{t['all']:,} | {t['compute']:,} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="Copy sequence lengths L.")
    p.add_argument("--branches", type=int, nargs="+", default=[2, 4], help="Branch factors of the tca tree.")
    p.add_argument("--batch", type=int, default=4, help="Context sets per call (default 4).")
    p.add_argument("--out", default="results/ops", help="Where ops.json and ops.md go.")
    args = p.parse_args()
    rows = run(args.lengths, args.branches, args.batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ops.json").write_text(json.dumps({"torch": torch.__version__, "batch": args.batch, "rows": rows}, indent=2))
    (out / "ops.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
