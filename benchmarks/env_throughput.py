"""Throughput of TreeRetrieval's vector env and of the SB3 adapter under PPO.

Trees of N = 4,096 tokens (the copy task at L = 8,192: 4,096 context tokens, 4,096 queries each), the
paper's copy model (D = 64, 4 heads, b = 2, no encoder), k = 11 levels. For E parallel queries
(default 1,024 and 16,384) it measures, with random actions drawn beforehand:

* query-steps/s of ``TreeRetrievalVectorEnv.step`` alone (tree building excluded) and end to end
  (sampling task batches and building their trees included), with numpy at the boundary;
* the same with ``array_type="torch"``: the difference is the cost of the numpy boundary per step;
* ``SB3VecEnv.step`` (SB3's list-of-dict infos, ``terminal_observation``) with random actions, and
  ``PPO.learn`` on it (rollouts + updates, the child-attention extractor): env transitions per second.

    python benchmarks/env_throughput.py                  # writes bench_out/env_throughput.{json,md}
    python benchmarks/env_throughput.py --envs 1024 --batches 2

Timings are medians over repeats on whatever else the machine is doing; nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def make_env(num_envs: int, seq_len: int, array_type: str):
    from tca_env.vector_env import TreeRetrievalVectorEnv

    return TreeRetrievalVectorEnv(num_envs, task="copy", task_options={"seq_len": seq_len}, seed=0,
                                  model_options={"encoder": "constant"}, array_type=array_type)


def time_vector_env(num_envs: int, seq_len: int, array_type: str, batches: int) -> dict:
    """Step through ``batches`` tree batches; time the step calls alone and the whole run."""
    env = make_env(num_envs, seq_len, array_type)
    env.reset(seed=0)
    q = env.queries
    k, rounds = q.k, q.rounds
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 2, num_envs) for _ in range(8)]
    if array_type == "torch":
        actions = [torch.from_numpy(a) for a in actions]
    step_times, n_steps, building = [], 0, 0.0
    t0 = time.perf_counter()
    for _ in range(batches * rounds):
        for s in range(k):
            a = actions[(n_steps + s) % len(actions)]
            ts = time.perf_counter()
            env.step(a)
            dt = time.perf_counter() - ts
            if s == k - 1 and q.round == 0:  # this step also sampled the next batch and built its trees
                building += dt
            else:
                step_times.append(dt)
        n_steps += k
    total = time.perf_counter() - t0
    step_ms = 1000 * statistics.median(step_times)
    return {"num_envs": num_envs, "array_type": array_type, "depth": k, "rounds_per_batch": rounds,
            "median_step_ms": step_ms, "query_steps_per_s_step_only": num_envs / (step_ms / 1000),
            "query_steps_per_s_end_to_end": num_envs * n_steps / total, "tree_build_s_per_batch": building / batches}


def time_sb3(num_envs: int, seq_len: int, steps: int, ppo_rollouts: int) -> dict:
    from agents.sb3 import SB3VecEnv, make_agent

    venv = make_env(num_envs, seq_len, "numpy")
    env = SB3VecEnv(venv)
    env.seed(0)
    env.reset()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(rng.integers(0, 2, num_envs))
    adapter = num_envs * steps / (time.perf_counter() - t0)
    agent = make_agent("ppo", venv, seed=0)
    per_rollout = agent.n_steps * num_envs
    agent.learn(per_rollout)  # warm-up: first reset, buffers
    t0 = time.perf_counter()
    agent.learn(ppo_rollouts * per_rollout, reset_num_timesteps=False)
    ppo = ppo_rollouts * per_rollout / (time.perf_counter() - t0)
    return {"num_envs": num_envs, "adapter_random_steps_per_s": adapter, "ppo_learn_steps_per_s": ppo,
            "ppo_n_steps": agent.n_steps, "ppo_batch_size": agent.batch_size, "ppo_n_epochs": agent.n_epochs}


def table(results: list[dict], sb3: list[dict]) -> str:
    lines = ["| parallel queries | arrays | step (ms, median) | query-steps/s, step only | query-steps/s, with tree "
             "building | tree batch build (s) |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['num_envs']:,} | {r['array_type']} | {r['median_step_ms']:.2f} | "
                     f"{r['query_steps_per_s_step_only']:,.0f} | {r['query_steps_per_s_end_to_end']:,.0f} | "
                     f"{r['tree_build_s_per_batch']:.2f} |")
    lines += ["", "| parallel queries | numpy boundary per step (ms) | share of a numpy step |", "|---|---|---|"]
    by = {(r["num_envs"], r["array_type"]): r for r in results}
    for e in sorted({r["num_envs"] for r in results}):
        if (e, "numpy") in by and (e, "torch") in by:
            diff = by[e, "numpy"]["median_step_ms"] - by[e, "torch"]["median_step_ms"]
            lines.append(f"| {e:,} | {diff:.2f} | {100 * diff / by[e, 'numpy']['median_step_ms']:.0f}% |")
    if sb3:
        lines += ["", "| parallel queries | SB3VecEnv steps/s (random actions) | PPO.learn env steps/s | "
                  "PPO n_steps x envs, batch, epochs |", "|---|---|---|---|"]
        for r in sb3:
            lines.append(f"| {r['num_envs']:,} | {r['adapter_random_steps_per_s']:,.0f} | "
                         f"{r['ppo_learn_steps_per_s']:,.0f} | {r['ppo_n_steps']} x {r['num_envs']:,}, "
                         f"{r['ppo_batch_size']}, {r['ppo_n_epochs']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", type=int, nargs="+", default=[1024, 16384], help="Parallel queries E.")
    p.add_argument("--seq-len", type=int, default=8192, help="Copy-task L: L/2 context tokens per tree.")
    p.add_argument("--batches", type=int, default=3, help="Tree batches stepped through per measurement.")
    p.add_argument("--sb3-envs", type=int, nargs="*", default=[1024], help="Parallel queries for the SB3 runs.")
    p.add_argument("--sb3-steps", type=int, default=44, help="SB3VecEnv steps with random actions.")
    p.add_argument("--ppo-rollouts", type=int, default=3, help="Timed PPO rollouts (+ updates).")
    p.add_argument("--threads", type=int, default=1, help="torch threads.")
    p.add_argument("--out", default="bench_out", help="Directory for env_throughput.json and .md.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = [time_vector_env(e, args.seq_len, arrays, args.batches) for e in args.envs
               for arrays in ("numpy", "torch")]
    sb3 = [time_sb3(e, args.seq_len, args.sb3_steps, args.ppo_rollouts) for e in args.sb3_envs]
    meta = {"seq_len": args.seq_len, "tokens_per_tree": args.seq_len // 2, "d_model": 64, "branch": 2,
            "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "env_throughput.json").write_text(json.dumps({"meta": meta, "vector_env": results, "sb3": sb3}, indent=2))
    md = table(results, sb3)
    (out / "env_throughput.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
