"""GP regression at a fixed budget, beside the official TCA code's numbers at the same budget.

Trains ReTreever (tca) and its full cross-attention baseline (ca) on GP regression with the RBF kernel,
the paper's model (D = 64, 4 heads, feed-forward 128, 6 encoder layers), batch 16, for ``--steps`` steps
and seeds 0 and 1, ``--jobs`` runs at a time (one thread each); then evaluates every final checkpoint on
one fixed evaluation set (``--eval-batches`` batches of 16 tasks, seed ``--eval-seed``) of the RBF
kernel and of Matern-5/2, with both averages of the target log-likelihood:

* ``paper``: the mean over batches of each batch's mean per-target log-likelihood (the paper's tables);
* ``pooled``: the mean over all targets pooled together (lower: batches with many targets have few
  context points).

Both overall and per context-size bin (N in 3-10, 11-20, 21-30, 31-46). Writes ``<out>/fidelity.json``,
``<out>/fidelity.md`` (the table beside the official code's numbers) and ``<out>/curves.png`` (the
held-out log-likelihood every ``--eval-every`` steps, read from each run's TensorBoard events, which
also hold it as ``eval/test/log_likelihood``).

    OMP_NUM_THREADS=1 python benchmarks/fidelity.py                    # 4,000 steps, tca and ca, seeds 0 1
    python benchmarks/fidelity.py --steps 100000 --seeds 0 --eval-every 10000 \\
        --runs-dir runs/gp-paper --out results/gp-paper                 # the paper's budget
    python benchmarks/fidelity.py --render-only                        # table and plot from existing runs

Runs are resumable: a run directory with a checkpoint continues from it (``tca train --resume true``),
and a finished run (its ``results.json`` at ``--steps``) is not trained again. Kill the script and start
it again with the same arguments to continue.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BINS = ((3, 10), (11, 20), (21, 30), (31, 46))
SPLITS = (("test", "RBF"), ("matern52", "Matern 5/2"))
# The official code (BorealisAI/tree-cross-attention), trained and evaluated on this machine's CPU with the
# same protocol (4,000 steps, batch 16, 6 encoder layers, seeds 0 and 1, 1,000 x 16 RBF evaluation tasks,
# the paper's metric): mean (seed 0 / seed 1).
OFFICIAL_4000 = {"tca": (0.671, (0.651, 0.690)), "ca": (0.729, (0.728, 0.731))}
# The paper's RBF numbers at 100,000 steps.
PAPER_100K = {"tca": 1.25, "ca": 1.35}


def run_name(decoder: str, seed: int) -> str:
    return f"gp-{decoder}-s{seed}"


def train_command(args: argparse.Namespace, decoder: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "training.cli", "train", "--task", "gp", "--kernel", "rbf", "--decoder", decoder,
            "--enc-layers", "6", "--steps", str(args.steps), "--batch-size", "16", "--eval-every",
            str(args.eval_every), "--eval-size", str(16 * args.curve_batches), "--eval-batch", "16",
            "--eval-seed", str(args.eval_seed), "--ckpt-every", str(args.ckpt_every), "--seed", str(seed),
            "--run-dir", str(Path(args.runs_dir) / run_name(decoder, seed)), "--resume", "true",
            "--progress", "false", "--threads", "1"]


def finished(run_dir: Path, steps: int) -> bool:
    f = run_dir / "results.json"
    return f.exists() and json.loads(f.read_text()).get("steps") == steps


def train_all(args: argparse.Namespace) -> None:
    """Every (decoder, seed) run, ``--jobs`` at a time, each a ``tca train`` subprocess with one thread."""
    todo = [(d, s) for d in args.decoders for s in args.seeds
            if not finished(Path(args.runs_dir) / run_name(d, s), args.steps)]
    running: list[tuple[str, subprocess.Popen, Any]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < args.jobs:
            d, s = todo.pop(0)
            name = run_name(d, s)
            log = open(Path(args.runs_dir) / f"{name}.log", "a")  # noqa: SIM115 - closed when the run ends
            print(f"[fidelity] training {name}: log {log.name}", flush=True)
            proc = subprocess.Popen(train_command(args, d, s), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=Path(__file__).resolve().parents[1])
            running.append((name, proc, log))
        time.sleep(5)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see {log.name}")
                print(f"[fidelity] {name} done", flush=True)


def evaluate(args: argparse.Namespace, decoder: str, seed: int) -> dict[str, Any]:
    """Both averages, overall and per context-size bin, on the fixed RBF and Matern evaluation sets."""
    import torch

    from tca_env.checkpoint import load_predictor
    from tca_env.tasks import make_task
    from tca_env.tasks.base import summarize_metric

    torch.set_num_threads(1)
    run_dir = Path(args.runs_dir) / run_name(decoder, seed)
    model, ckpt = load_predictor(run_dir / "checkpoint.pt")
    task = make_task("gp", kernel="rbf")
    out: dict[str, Any] = {"step": ckpt["step"]}
    with torch.no_grad():
        for split, _ in SPLITS:
            batches = task.eval_batches(16 * args.eval_batches, 16, args.eval_seed, split=split)
            per_batch = [model.head.metric(model.predict(b), b.yt) for b in batches]
            paper, pooled = summarize_metric(per_batch)
            res: dict[str, Any] = {"paper": paper, "pooled": pooled, "bins": {}}
            for lo, hi in BINS:
                sel = [m for m, b in zip(per_batch, batches, strict=True) if lo <= b.N <= hi]
                if sel:
                    p, q = summarize_metric(sel)
                    res["bins"][f"{lo}-{hi}"] = {"paper": p, "pooled": q, "batches": len(sel)}
            out[split] = res
    report = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    out["wall_time_s"] = report.get("wall_time_s")
    out["ms_per_step"] = step_time_ms(run_dir)
    return out


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one TensorBoard scalar, over every event file of a run (resumed runs have several)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    return sorted(points.items())


def step_time_ms(run_dir: Path) -> float | None:
    """Median training time per step (from the trainer's logged steps/s, evaluations excluded by the median)."""
    sps = [v for _, v in scalars(run_dir, "train/steps_per_sec")]
    return 1000.0 / statistics.median(sps) if sps else None


def time_steps(repeats: int, seed: int = 0) -> dict[str, float]:
    """Median time of one training step (forward, backward, Adam) of tca and ca on GP batches of 16, one
    thread, the two models alternating step by step in one process so that machine load hits both alike."""
    import torch

    from tca_env.model import ModelConfig, ReTreever
    from tca_env.tasks import make_task

    torch.set_num_threads(1)
    task = make_task("gp", kernel="rbf")
    models = {d: ReTreever(ModelConfig.for_task(task, decoder=d, enc_layers=6)).train() for d in ("tca", "ca")}
    opts = {d: torch.optim.Adam(m.parameters(), lr=5e-4) for d, m in models.items()}
    g, gs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    times: dict[str, list[float]] = {d: [] for d in models}
    for i in range(repeats + 5):
        batch = task.sample(16, g)
        for d, m in models.items():
            t = time.perf_counter()
            out = m(batch, generator=gs)
            opts[d].zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[d].step()
            if i >= 5:  # warm-up
                times[d].append(time.perf_counter() - t)
    return {f"{d}_ms": 1000 * statistics.median(v) for d, v in times.items()}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def render(args: argparse.Namespace, results: dict[str, dict[int, dict[str, Any]]],
           timing: dict[str, float] | None = None) -> str:
    seeds = args.seeds
    seed_txt = " / ".join(f"s{s}" for s in seeds)
    lines = [f"# GP regression (RBF) at {args.steps:,} steps, batch 16, 6 encoder layers", "",
             f"Evaluation: {args.eval_batches:,} batches of 16 tasks (seed {args.eval_seed}), the same for every "
             "model. `paper` = mean over batches of each batch's mean target log-likelihood (the paper's metric); "
             "`pooled` = mean over all targets. Produced by `OMP_NUM_THREADS=1 python benchmarks/fidelity.py "
             f"--steps {args.steps} --seeds {' '.join(map(str, seeds))} --eval-every {args.eval_every} "
             f"--eval-batches {args.eval_batches} --runs-dir {args.runs_dir} --out {args.out}`.", ""]

    def cell(dec: str, split: str, key: str = "paper") -> str:
        vals = [results[dec][s][split][key] for s in seeds if s in results.get(dec, {})]
        if not vals:
            return "-"
        return f"{mean(vals):.3f} ({' / '.join(f'{v:.3f}' for v in vals)})"

    has = [d for d in ("tca", "ca") if d in results]
    lines += [f"| | {' | '.join(has)} | ca - tca |", "|---|" + "---|" * (len(has) + 1)]
    if args.steps == 4000 and seeds == [0, 1]:
        off = [f"{OFFICIAL_4000[d][0]:.3f} ({' / '.join(f'{v:.3f}' for v in OFFICIAL_4000[d][1])})" for d in has]
        lines.append(f"| official code, RBF, paper metric | {' | '.join(off)} | "
                     f"{OFFICIAL_4000['ca'][0] - OFFICIAL_4000['tca'][0]:.2f} |")
    if args.steps == 100_000:
        lines.append(f"| the paper (100k steps, RBF) | {' | '.join(str(PAPER_100K[d]) for d in has)} | 0.10 |")
    for split, title in SPLITS:
        for key in ("paper", "pooled"):
            vals = {d: [results[d][s][split][key] for s in seeds if s in results[d]] for d in has}
            gap = (f"{mean(vals['ca']) - mean(vals['tca']):.2f}" if all(vals.get(d) for d in ("ca", "tca"))
                   else "-")
            lines.append(f"| this package, {title}, {key} | {' | '.join(cell(d, split, key) for d in has)} | {gap} |")
    lines += ["", f"Cells: mean over seeds ({seed_txt} in brackets).", ""]
    lines += ["## Per context size (RBF, paper metric / pooled, mean over seeds)", "",
              "| N | " + " | ".join(has) + " |", "|---|" + "---|" * len(has)]
    for lo, hi in BINS:
        row = []
        for d in has:
            ps = [results[d][s]["test"]["bins"].get(f"{lo}-{hi}") for s in seeds if s in results[d]]
            ps = [p for p in ps if p]
            row.append(f"{mean([p['paper'] for p in ps]):.3f} / {mean([p['pooled'] for p in ps]):.3f}" if ps else "-")
        lines.append(f"| {lo}-{hi} | " + " | ".join(row) + " |")
    lines += ["", "## Training time (one thread)", "",
              "| run | steps | median ms / step | wall time of the last process (s) |", "|---|---|---|---|"]
    for d in has:
        for s in seeds:
            r = results[d].get(s)
            if r:
                ms = f"{r['ms_per_step']:.1f}" if r.get("ms_per_step") else "-"
                wall = f"{r['wall_time_s']:.0f}" if r.get("wall_time_s") else "-"
                lines.append(f"| {d} seed {s} | {r['step']:,} | {ms} | {wall} |")
    lines += ["", "The runs' step times come from their logged steps/s, with other runs sharing the two cores. A run "
              "resumed from a checkpoint reports the wall time of its last process only."]
    if timing:
        lines += ["", f"Timed in one process (`--time-steps {timing['repeats']}`: tca and ca alternating step by step, "
                  f"GP batches of 16, one thread, median): **tca {timing['tca_ms']:.1f} ms, ca "
                  f"{timing['ca_ms']:.1f} ms per step ({timing['tca_ms'] / timing['ca_ms']:.2f}x)**. Absolute times "
                  "scale with the machine's load; the ratio is the robust number."]
    return "\n".join(lines) + "\n"


def plot_curves(args: argparse.Namespace, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, d in enumerate(args.decoders):
        for j, s in enumerate(args.seeds):
            pts = scalars(Path(args.runs_dir) / run_name(d, s), "eval/test/log_likelihood")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", ls=("-", "--", ":")[j % 3],
                        marker="o", ms=3, label=f"{d} seed {s}")
    if args.steps == 4000:
        for i, d in enumerate(args.decoders):
            if d in OFFICIAL_4000:
                ax.axhline(OFFICIAL_4000[d][0], color=f"C{i}", lw=0.8, alpha=0.6, label=f"official {d} at 4,000")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out target log-likelihood (paper metric)")
    ax.set_title("GP regression (RBF)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000, help="Training steps per run (batch 16).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="Seeds to train (parameters, batches, searches).")
    p.add_argument("--decoders", nargs="+", default=["tca", "ca"], choices=["tca", "ca", "perceiver"],
                   help="Read-outs to train.")
    p.add_argument("--jobs", type=int, default=2, help="Runs trained at the same time (one thread each).")
    p.add_argument("--eval-every", type=int, default=500, help="Steps between the learning curve's evaluations.")
    p.add_argument("--curve-batches", type=int, default=1000,
                   help="Batches of 16 in the learning curve's evaluation set (inside training).")
    p.add_argument("--eval-batches", type=int, default=1000, help="Batches of 16 in the final evaluation set.")
    p.add_argument("--eval-seed", type=int, default=10_000, help="Seed of the evaluation sets.")
    p.add_argument("--ckpt-every", type=int, default=500, help="Checkpoint every this many steps (resume point).")
    p.add_argument("--runs-dir", default="runs/fidelity", help="Where the runs (checkpoints, TensorBoard) go.")
    p.add_argument("--out", default="results/fidelity", help="Where fidelity.json, fidelity.md and curves.png go.")
    p.add_argument("--time-steps", type=int, default=0,
                   help="Also time this many training steps of tca and ca alone (run on an idle machine).")
    p.add_argument("--render-only", action="store_true",
                   help="Evaluate existing checkpoints and render; train nothing.")
    args = p.parse_args()
    if not args.render_only:
        train_all(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for d in args.decoders:
        for s in args.seeds:
            if (Path(args.runs_dir) / run_name(d, s) / "checkpoint.pt").exists():
                print(f"[fidelity] evaluating {run_name(d, s)}", flush=True)
                results.setdefault(d, {})[s] = evaluate(args, d, s)
    timing = None
    if args.time_steps:
        timing = {**time_steps(args.time_steps), "repeats": args.time_steps}
    elif (out / "fidelity.json").exists():  # keep an earlier timing when only re-rendering
        timing = json.loads((out / "fidelity.json").read_text()).get("timing")
    (out / "fidelity.json").write_text(json.dumps({"args": vars(args), "results": results, "timing": timing},
                                                  indent=2))
    md = render(args, results, timing)
    (out / "fidelity.md").write_text(md)
    plot_curves(args, out / "curves.png")
    print(md)


if __name__ == "__main__":
    main()
