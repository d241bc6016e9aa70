"""Learning on TreeRetrieval: greedy accuracy of predictor + agent after co-training, per agent.

The copy task with 64 context tokens (L = 128; trees of depth 5, |S| = 7 tokens), the copy task's
reference settings (D = 64, no encoder, dropout 0.1, Adam beta1 0.1), batch 16, the same predictor
budget (``--steps`` updates) for every agent. Each agent runs ``tca train --agent NAME`` in a fresh
process, one after the other; the random agent, co-trained with the same budget, is the floor.

    python benchmarks/cotrain_agents.py                                   # all agents, bench_out/agents.{json,md}
    python benchmarks/cotrain_agents.py --agents reinforce ppo --extra "--reward nce" --name agents-nce

Accuracy is the held-out greedy accuracy (``eval/test/accuracy``: 1,000 fixed sequences, the agent's
greedy path, the predictor's prediction from S). Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

AGENTS = ("reinforce", "maskable_ppo", "ppo", "a2c", "dqn", "random")
TARGETS = {"reinforce": 0.99, "maskable_ppo": 0.95, "ppo": 0.95}
COPY = ["--task", "copy", "--seq-len", "128", "--encoder", "constant", "--dropout", "0.1", "--beta1", "0.1",
        "--batch-size", "16"]


def command(agent: str, steps: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "training.cli", "train", *COPY, "--agent", agent, "--steps", str(steps),
            "--eval-every", str(max(steps // 6, 1)), "--eval-size", "1000", "--ckpt-every", "0",
            "--progress", "false", "--run-dir", str(run_dir), *extra]


def evals(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    tag = "eval/test/accuracy"
    return [(e.step, e.value) for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def table(rows: list[dict]) -> str:
    floor = next((r["accuracy"] for r in rows if r["agent"] == "random"), None)
    lines = ["| agent | greedy accuracy | target | random floor | accuracy during training (step: acc) | wall time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        target = f">= {TARGETS[r['agent']]:.0%}" if r["agent"] in TARGETS else "reported"
        curve = ", ".join(f"{s}: {a:.3f}" for s, a in r["curve"])
        fl = "" if floor is None else f"{floor:.4f}"
        lines.append(f"| {r['agent']} | {r['accuracy']:.4f} | {target} | {fl} | {curve} | {r['wall_s'] / 60:.1f} min |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", nargs="+", default=list(AGENTS), help="Agents to co-train, in order.")
    p.add_argument("--steps", type=int, default=2000, help="Predictor updates (tree batches) per agent.")
    p.add_argument("--runs", default="runs/bench-agents", help="Parent directory of the run directories.")
    p.add_argument("--extra", default="", help="Extra flags for every `tca train`, e.g. '--reward nce'.")
    p.add_argument("--out", default="bench_out", help="Directory for the results.")
    p.add_argument("--name", default="agents", help="Results go to OUT/NAME.json and OUT/NAME.md.")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for agent in args.agents:
        run_dir = Path(args.runs) / args.name / agent
        if run_dir.exists():  # a stale run's events would mix into the accuracy curve
            shutil.rmtree(run_dir)
        cmd = command(agent, args.steps, run_dir, shlex.split(args.extra))
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - t0
        shown = shlex.join(["OMP_NUM_THREADS=1", "python", *cmd[1:]])
        if res.returncode != 0:
            rows.append({"agent": agent, "error": res.stderr[-2000:], "command": shown})
            print(f"{agent}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        report = json.loads((run_dir / "results.json").read_text())
        rows.append({"agent": agent, "accuracy": report["eval"]["test/accuracy"], "curve": evals(run_dir),
                     "wall_s": wall, "train_wall_s": report["wall_time_s"], "steps": report["steps"],
                     "command": shown})
        print(f"{agent}: greedy accuracy {rows[-1]['accuracy']:.4f} in {wall / 60:.1f} min", flush=True)
        ok = [r for r in rows if "error" not in r]
        (out / f"{args.name}.json").write_text(json.dumps({"steps": args.steps, "extra": args.extra, "results": rows},
                                                           indent=2))
        (out / f"{args.name}.md").write_text(table(ok) + "\n")


if __name__ == "__main__":
    main()
