"""Where tca's time goes against ca's, measured in one process with the decoders interleaved.

Complements ``speed.py`` (a fresh process per measurement, which is what the targets are read from)
with lower-noise numbers for the two targets that sit closest to their limits:

* greedy inference at L = 1024 (target: tca <= 1.0x ca): ``tca.predict`` and ``ca.predict``
  alternate for ``--repeats`` rounds; medians, the ratio, and the minor page faults per call (fresh
  multi-MiB tensors cost page faults that move single timings by several ms);
* the training step at L = 256 (target: tca <= 2x ca). tca <= 2x ca is the same as "tca's extra work
  <= ca's whole step". tca's extra work is timed piece by piece, each forward + backward on its own
  with gradients of the real step's shapes: the tree (aggregation of all levels) with the node keys
  and values, the search + read-out over S, and the second read-out's feed-forward + head + loss
  (L_TCA's prediction, the same work as ca's one read-out). The tree's matrix products are also
  counted and divided by this core's measured matrix-product rate: the time the tree would take if
  everything in it ran at that rate.

    OMP_NUM_THREADS=1 python benchmarks/breakdown.py --out results/speed

Writes breakdown.json and breakdown.md to ``--out``. Timings are medians; nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleave(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median ms (and median minor page faults) per call of each function, called in turn."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict = {k: [] for k in fns}
    faults: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            f0, t0 = _faults(), time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            faults[k].append(_faults() - f0)
    return {k: {"ms": 1000 * statistics.median(times[k]), "faults": statistics.median(faults[k])} for k in fns}


def matmul_gflops(rows: int = 4096, d: int = 64, n: int = 192) -> float:
    """This core's rate on the tree's kind of product ([rows, d] x [d, n]), GFLOP/s."""
    a, b = torch.randn(rows, d), torch.randn(d, n)
    out = torch.empty(rows, n)
    ts = []
    for _ in range(30):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        ts.append(time.perf_counter() - t0)
    return 2 * rows * d * n / statistics.median(ts) / 1e9


def tree_train_flops(shape, batch: int, d: int, f: int) -> float:
    """Multiply-adds x 2 of the training aggregation (forward + backward, detached inputs) and of the
    node keys/values (forward + backward) for one batch of trees."""
    b, k, P = shape.b, shape.k, shape.P
    rows = batch * P * b**k + sum(batch * b**lvl * b for lvl in range(k))  # children rows over all levels
    groups = sum(batch * b**lvl for lvl in range(k + 1))  # one node per group
    fwd = rows * (d * 3 * d + d * d + d * f) + groups * f * d
    # backward: every weight gradient (= the forward's products) + input gradients of the out-projection,
    # FF1 and FF2 (the QKV product's input gradient is not needed: the level's input is detached)
    bwd = fwd + rows * (d * d + d * f) + groups * f * d
    nodes = groups - batch  # every node below the root gets keys and values
    kv = 3 * nodes * d * 2 * d  # forward, weight gradient, input gradient
    return 2.0 * (fwd + bwd + kv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--infer-len", type=int, default=1024, help="Sequence length L of the inference comparison.")
    p.add_argument("--train-len", type=int, default=256, help="Sequence length L of the training comparison.")
    p.add_argument("--batch", type=int, default=16, help="Batch size (the speed benchmark's 16).")
    p.add_argument("--repeats", type=int, default=30, help="Interleaved rounds per comparison (medians).")
    p.add_argument("--threads", type=int, default=1, help="torch threads.")
    p.add_argument("--out", default="bench_out", help="Directory for breakdown.json and breakdown.md.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from tca_env import kernels
    from tca_env import search as S
    from tca_env.model import ModelConfig, ReTreever
    from tca_env.tasks import make_task
    from tca_env.tree import build_tree

    kernels.library()

    def models(L: int, train: bool):
        task = make_task("copy", seq_len=L)
        out = {}
        for dec in ("tca", "ca"):
            torch.manual_seed(0)
            m = ReTreever(ModelConfig.for_task(task, decoder=dec, encoder="constant", dropout=0.1))
            out[dec] = m.train(train)
        return out, task.sample(args.batch, torch.Generator().manual_seed(0))

    res: dict = {"meta": vars(args) | {"kernels": kernels.library() is not None}}

    # ------------------------------------------------------------------ greedy inference
    ms, data = models(args.infer_len, train=False)
    inf = interleave({d: (lambda m=m: m.predict(data)) for d, m in ms.items()}, args.repeats)
    inf["ratio"] = inf["tca"]["ms"] / inf["ca"]["ms"]
    res["infer"] = inf
    print(f"inference L={args.infer_len}: tca {inf['tca']['ms']:.1f} ms, ca {inf['ca']['ms']:.1f} ms, "
          f"ratio {inf['ratio']:.3f}", flush=True)

    # ------------------------------------------------------------------ training step
    ms, data = models(args.train_len, train=True)
    opts = {d: torch.optim.Adam(m.parameters(), 5e-4) for d, m in ms.items()}
    gens = {d: torch.Generator().manual_seed(0) for d in ms}

    def step(d):
        o = ms[d](data, generator=gens[d])
        opts[d].zero_grad()
        o.loss.backward()
        opts[d].step()

    tca = ms["tca"]
    c = tca.cfg
    with torch.no_grad():
        enc = tca.encode_context(data)
        qe = tca.embed_queries(data)
        ref_tree = build_tree(enc, c.branch, tca.aggregator, c.ordering, data.xc, c.coord, c.bptt)
        ref_kv = S.TreeKV.from_tree(ref_tree, tca.readout.keys_values)
        q = tca.readout.queries(qe)
        attn0, _ = S.search_readout(ref_kv, q, "greedy")
    g = torch.Generator().manual_seed(1)

    def rand_like(t):
        return torch.randn(t.shape, generator=g)

    up_nodes = [(rand_like(k), rand_like(v)) for k, v in zip(ref_kv.keys, ref_kv.values, strict=True)]

    def fresh_grads(*tensors):  # as after optimizer.zero_grad(): backward assigns instead of accumulating
        tca.zero_grad(set_to_none=True)
        for t in tensors:
            t.grad = None

    def tree_part():  # aggregation of every level + node keys/values, forward and backward
        fresh_grads()
        tree = build_tree(enc, c.branch, tca.aggregator, c.ordering, data.xc, c.coord, c.bptt)
        kv = S.TreeKV.from_tree(tree, tca.readout.keys_values, (ref_kv.tok_keys, ref_kv.tok_values))
        loss = sum((k * gk).sum() + (v * gv).sum() for (k, v), (gk, gv) in zip(
            zip(kv.keys, kv.values, strict=True), up_nodes, strict=True))
        loss.backward()

    leaf = [t.detach().requires_grad_() for t in (q, ref_kv.tok_keys, ref_kv.tok_values, *ref_kv.keys, *ref_kv.values)]
    up_attn, sgen = rand_like(attn0), torch.Generator().manual_seed(2)

    def search_part():  # sampled search + read-out over S with log-prob and entropy, forward and backward
        fresh_grads(*leaf)
        k = ref_kv.shape.k
        kv = S.TreeKV(ref_kv.shape, leaf[3:3 + k], leaf[3 + k:], ref_kv.masks, leaf[1], leaf[2], ref_kv.tok_mask)
        attn, d = S.search_readout(kv, leaf[0], "sample", None, sgen)
        ((attn * up_attn).sum() + d.log_prob.sum() + d.entropy.sum()).backward()

    x_in, a_in = qe.detach().requires_grad_(), attn0.detach().requires_grad_()

    def readout_part():  # one read-out's residual + feed-forward + head + loss, forward and backward
        fresh_grads(x_in, a_in)
        out = tca.head(tca.readout.finish(x_in, a_in))
        tca.head.loss(out, data.yt).mean().backward()

    pieces = {"tree + node K/V": tree_part, "search + read-out over S": search_part,
              "second read-out + head + loss": readout_part}
    tr = interleave({"tca": lambda: step("tca"), "ca": lambda: step("ca"), **pieces}, args.repeats)
    rate = matmul_gflops()
    floor_ms = tree_train_flops(ref_tree.shape, args.batch, c.d_model, c.dim_ff) / rate / 1e6
    extra = tr["tca"]["ms"] - tr["ca"]["ms"]
    tr.update(ratio=tr["tca"]["ms"] / tr["ca"]["ms"], extra_ms=extra, matmul_gflops=rate, tree_floor_ms=floor_ms,
              rest_ms=extra - sum(tr[k]["ms"] for k in pieces))
    res["train"] = tr
    print(f"training L={args.train_len}: tca {tr['tca']['ms']:.1f} ms, ca {tr['ca']['ms']:.1f} ms, "
          f"ratio {tr['ratio']:.3f}", flush=True)

    lines = [f"Interleaved in one process, {args.repeats} rounds, medians, {args.threads} thread(s), batch "
             f"{args.batch}; `python benchmarks/breakdown.py`.", "",
             f"**Greedy inference, L = {args.infer_len}**: tca {inf['tca']['ms']:.1f} ms "
             f"({inf['tca']['faults']:.0f} page faults per call), ca {inf['ca']['ms']:.1f} ms "
             f"({inf['ca']['faults']:.0f}): **{inf['ratio']:.2f}x**.", "",
             f"**Training step, L = {args.train_len}**: tca {tr['tca']['ms']:.1f} ms, ca {tr['ca']['ms']:.1f} ms: "
             f"**{tr['ratio']:.2f}x**. tca <= 2x ca means tca's extra work ({extra:.1f} ms) <= ca's whole step "
             f"({tr['ca']['ms']:.1f} ms). The extra work, each piece timed alone (forward + backward):", "",
             "| piece of tca's extra work | ms | share of ca's step |", "|---|---|---|"]
    for k in pieces:
        lines.append(f"| {k} | {tr[k]['ms']:.1f} | {tr[k]['ms'] / tr['ca']['ms']:.2f} |")
    lines += [f"| rest (RL loss, autograd and Python overhead, Adam on the aggregator) | {tr['rest_ms']:.1f} | "
              f"{tr['rest_ms'] / tr['ca']['ms']:.2f} |",
              f"| **total extra** | **{extra:.1f}** | **{extra / tr['ca']['ms']:.2f}** |", "",
              f"The tree's matrix products (forward + backward, with node keys/values) at this core's measured "
              f"{rate:.0f} GFLOP/s would take {floor_ms:.1f} ms: the tree piece's floor if nothing but its "
              f"products cost time."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps(res, indent=2))
    (out / "breakdown.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
