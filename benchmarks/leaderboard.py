"""Reference scores of the benchmark ids: every agent at a fixed budget, scored by ``tca_env.evaluate``.

For each id: the random policy, the leftmost child, the shipped predictor's own greedy policy
(``make_agent("predictor", env)``), the correct-leaf oracle where the task knows each query's target
(copy), and agents trained for ``--steps`` env steps on the frozen predictor
with the package's defaults for TreeRetrieval (``agents.sb3.sb3_defaults``): REINFORCE on the paper's
attention policy (freshly initialised), PPO, A2C, DQN and MaskablePPO; plus stock
``PPO("MultiInputPolicy", gym.make(id))`` with SB3's default hyperparameters on one env. Each is
evaluated greedily on the same ``--episodes`` fixed-seed episodes, with a 95% interval and a normalised
score (random = 0, predictor greedy = 1).

    OMP_NUM_THREADS=1 python benchmarks/leaderboard.py                  # writes results/leaderboard.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/leaderboard.py --steps 20000 --episodes 2000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO

import tca_env
from agents.attention import ReinforceAgent
from agents.base import play_episodes
from agents.sb3 import SB3VecEnv, make_agent
from tca_env.evaluation import evaluate, varying_queries
from tca_env.model import ReTreever
from tca_env.vector_env import TreeRetrievalVectorEnv

TRAINED = ("reinforce", "ppo", "a2c", "dqn", "maskable_ppo")



def train_reinforce(env: TreeRetrievalVectorEnv, steps: int, seed: int) -> ReinforceAgent:
    """REINFORCE on the paper's attention policy, freshly initialised (not the predictor's trained read-out,
    which would start at the reference score); the predictor stays frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = ReTreever(env.predictor.cfg)
    agent = ReinforceAgent(fresh, shared=False, seed=seed)
    obs, _ = env.reset(seed=seed)
    done = 0
    while done < steps:
        obs, rollout = play_episodes(agent, env, obs)
        done += env.num_envs * rollout.steps
        agent.update(rollout)
    return agent


def run_id(env_id: str, args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}

    def score(name: str, policy: Any, train_s: float = 0.0, note: str = "", env: Any = None) -> None:
        if env is None:
            env = gym.make_vec(env_id, num_envs=args.eval_envs, vectorization_mode="vector_entry_point")
        out = evaluate(policy, env=env, episodes=args.episodes, seed=args.eval_seed)
        rows[name] = {**out, "train_s": train_s, "note": note}
        print(f"[leaderboard] {env_id} {name:22s} {out['reward']:+.4f} +/- {out['reward_ci95']:.4f} "
              f"({train_s:.0f} s training)", flush=True)

    probe = gym.make_vec(env_id, num_envs=args.envs, vectorization_mode="vector_entry_point", seed=args.seed)
    score("random", make_agent("random", probe, seed=args.seed))
    score("leftmost child", lambda o: np.asarray(o["action_mask"]).astype(bool).argmax(-1))
    score("predictor (greedy)", make_agent("predictor", probe))
    oracle_env = gym.make_vec(env_id, num_envs=args.eval_envs, vectorization_mode="vector_entry_point")
    try:
        oracle = make_agent("correct_leaf", oracle_env)
    except ValueError:  # the task does not know its queries' targets
        oracle = None
    if oracle is not None:  # the oracle acts on the env it reads, so it is scored on that one
        score("correct leaf (oracle)", oracle, env=oracle_env)
    # Agents train on the lockstep vector env, which needs the same number of queries in every batch; where the
    # id's task varies it (GP: M ~ U{3..49-N}), they train with M fixed at --train-queries (a size option: the
    # same predictor; each query is its own episode, so only how often each N comes up shifts: N is uniform
    # over 3..46 per episode instead of weighted towards small N) and are scored on the id itself.
    train_options = {"num_target": args.train_queries} if varying_queries(probe) else {}
    trained_on = f", M = {args.train_queries}" if train_options else ""
    # task_options only where sizes change, added to the id's own: passing it replaces the registered ones
    sizes = {"task_options": {**gym.spec(env_id).kwargs.get("task_options", {}), **train_options}} \
        if train_options else {}
    for name in TRAINED if args.agents is None else args.agents:
        torch.manual_seed(args.seed)
        env = gym.make_vec(env_id, num_envs=args.envs, vectorization_mode="vector_entry_point", seed=args.seed,
                           **sizes)
        t0 = time.perf_counter()
        if name == "reinforce":
            agent = train_reinforce(env, args.steps, args.seed)
        else:
            agent = make_agent(name, SB3VecEnv(env), seed=args.seed)
            agent.learn(total_timesteps=args.steps)
        score(name, agent, time.perf_counter() - t0, f"{args.steps:,} env steps, {args.envs} envs{trained_on}")
    torch.manual_seed(args.seed)  # stock PPO: one env (it serves any number of queries per set), the id itself
    t0 = time.perf_counter()
    stock = PPO("MultiInputPolicy", gym.make(env_id), seed=args.seed, verbose=0)
    stock.learn(total_timesteps=args.stock_steps)
    score("PPO (stock SB3, 1 env)", stock, time.perf_counter() - t0, f"{args.stock_steps:,} env steps, defaults")
    lo, hi = rows["random"]["reward"], rows["predictor (greedy)"]["reward"]
    for r in rows.values():
        r["normalised"] = (r["reward"] - lo) / (hi - lo) if hi != lo else float("nan")
    return rows


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# Leaderboard: reference scores of the benchmark ids", "",
             f"Produced by `OMP_NUM_THREADS=1 python benchmarks/leaderboard.py --steps {args.steps} "
             f"--episodes {args.episodes}` (`tca_env.evaluate`: greedy actions, the same {args.episodes:,} "
             f"fixed-seed episodes for every policy, seed {args.eval_seed}; 95% interval of the mean). Normalised: "
             "random = 0, the shipped predictor's greedy policy = 1. Trained agents learn on the frozen shipped "
             "predictor with the package's defaults (`agents.sb3.sb3_defaults`; REINFORCE on "
             "the paper's attention policy, freshly initialised).", ""]
    for env_id, rows in results.items():
        lines += [f"## `{env_id}`", "", "| policy | mean leaf reward | 95% interval | normalised | training |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            train = f"{r['note']}, {r['train_s']:.0f} s" if r["note"] else "-"
            lines.append(f"| {name} | {r['reward']:.4f} | +/- {r['reward_ci95']:.4f} | {r['normalised']:.3f} | "
                         f"{train} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", nargs="+", default=list(tca_env.BENCHMARK_IDS), help="Benchmark env ids.")
    p.add_argument("--agents", nargs="+", default=None, choices=TRAINED, help="Trained agents (default: all).")
    p.add_argument("--steps", type=int, default=50_000, help="Env steps per trained agent.")
    p.add_argument("--stock-steps", type=int, default=50_000, help="Env steps of stock PPO.")
    p.add_argument("--envs", type=int, default=256, help="Vector envs the agents train on.")
    p.add_argument("--train-queries", type=int, default=3,
                   help="Queries per context set the agents train with where the id's task varies them (GP: M is "
                        "at most 49 - N, so 3 is the largest M every N allows).")
    p.add_argument("--episodes", type=int, default=10_000, help="Evaluation episodes per policy.")
    p.add_argument("--eval-envs", type=int, default=1000, help="Vector envs of the evaluation.")
    p.add_argument("--eval-seed", type=int, default=0, help="Seed of the evaluation episodes.")
    p.add_argument("--seed", type=int, default=0, help="Seed of training.")
    p.add_argument("--out", default="results", help="Where leaderboard.json / leaderboard.md go.")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "leaderboard.json"
    # Ids run before with the same budget stay in the table (run ids one at a time, or re-run one).
    results: dict[str, Any] = {}
    if previous.is_file():
        old = json.loads(previous.read_text())
        same = all(old["args"].get(k) == getattr(args, k) for k in ("steps", "stock_steps", "episodes", "eval_seed",
                                                                     "seed", "envs"))
        results = old["results"] if same else {}
    results.update({env_id: run_id(env_id, args) for env_id in args.ids})
    (out / "leaderboard.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    (out / "leaderboard.md").write_text(render(results, args))
    print(f"[leaderboard] wrote {out / 'leaderboard.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
