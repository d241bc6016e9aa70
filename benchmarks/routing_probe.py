"""Can a tca model's search learn to route at all? A probe that tells the search where to go.

Continues a checkpoint of a task with known target tokens (recall, copy), but instead of REINFORCE it trains
the search by teacher forcing: the cross-entropy of the right child at every level (the ancestors of the
token each query needs, :func:`tca_env.diagnostics.ancestors`) plus the read-out's loss on that right path.
Every ``--eval-every`` steps it prints the greedy search report (leaf hit, routing per level) on fixed sets.
If routing stays put even with the answer given, the limit is what the node embeddings can represent, not
the reinforcement signal; ``--bptt true`` lets the routing gradients flow down through the tree's levels into
the aggregator's inputs and the token embeddings (the model's ``bptt`` option).

    python benchmarks/routing_probe.py results/scale/saved/recall-tca-deep/checkpoint.pt --bptt false --steps 1000
    python benchmarks/routing_probe.py results/scale/saved/recall-tca-deep/checkpoint.pt --bptt true --steps 1500

A diagnostic, not a way to train: the package's search learns by reinforcement, as in the paper.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from search_report import evaluate as search_sets  # the search report's evaluation, beside this script

from tca_env import search as S
from tca_env.checkpoint import load_predictor, task_of
from tca_env.diagnostics import ancestors, describe
from tca_env.tasks import make_task


def probe(ckpt: str, bptt: bool, steps: int, eval_every: int = 250, batch_size: int = 16, lr: float = 5e-4,
          eval_sets: int = 4, seed: int = 1, log=print) -> list[dict]:
    """Teacher-forced training of ``ckpt``'s model for ``steps`` steps; the search report every ``eval_every``."""
    model, state = load_predictor(ckpt, "cpu")
    if model.cfg.decoder != "tca":
        raise ValueError(f"{ckpt} holds a {model.cfg.decoder!r} model; the probe needs a tca model")
    model.cfg = dataclasses.replace(model.cfg, bptt=bptt)
    name, options = task_of(state)
    task = make_task(name, **options)
    # Evaluation at the task's largest size, where the deep levels exist.
    ev_options = {**options, "min_context_len": None} if "min_context_len" in options else options
    ev_task = make_task(name, **ev_options)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def evaluate() -> dict:
        report, p_right, _ = search_sets(model, ev_task, eval_sets)
        model.train()
        # right_path_log_prob: the mean log-probability of the whole right path, what teacher forcing raises
        return {**report, "right_path_log_prob": p_right.log().sum(-1).mean().item()}

    log_rows, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            r = {"step": step, "seconds": time.perf_counter() - t0, **evaluate()}
            log_rows.append(r)
            log(f"step {step}: log pi(right path) {r['right_path_log_prob']:.3f}; " + "; ".join(describe(r)))
        if step == steps:
            break
        batch = task.sample(batch_size, gen)
        ctx = model.prepare(batch)
        right = ancestors(ctx.tree, task.target_tokens(batch))
        attn, d = S.search_readout(ctx.kv, ctx.q, "greedy", S.path_actions(right, ctx.kv.shape.b))
        out = model.head(model.readout.finish(ctx.query_emb, attn))
        loss = model.head.loss(out, batch.yt).mean() - d.log_prob.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return log_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="A tca checkpoint of a task with known target tokens (recall, copy).")
    p.add_argument("--bptt", choices=("true", "false"), default="false",
                   help="Let the routing gradients flow through every level of the tree (default: false, the paper's).")
    p.add_argument("--steps", type=int, default=1000, help="Teacher-forced training steps.")
    p.add_argument("--eval-every", type=int, default=250, help="Steps between search reports.")
    p.add_argument("--batch-size", type=int, default=16, help="Context sets per step.")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam's learning rate (a fresh optimiser).")
    p.add_argument("--json", default=None, help="Write the reports to this JSON file.")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = probe(args.checkpoint, args.bptt == "true", args.steps, args.eval_every, args.batch_size, args.lr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
