"""The one evaluation protocol: a policy's mean leaf reward over fixed-seed episodes of an env id.

    from tca_env import evaluate
    evaluate(model, "TreeRetrieval-Copy-Easy-v0", episodes=10_000, seed=0)   # an SB3 model, an agent, a callable

Every number in the README's reference-score tables comes from this function: the same episodes for
every policy (the env is reset with ``seed`` and steps through its batches in order), greedy actions
(``deterministic=True``), and a 95% interval of the mean (normal approximation, 1.96 standard errors).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from .vector_env import TreeRetrievalVectorEnv


def _actions(policy: Any, obs: dict[str, Any]) -> np.ndarray:
    if hasattr(policy, "predict"):
        params = inspect.signature(policy.predict).parameters
        kwargs: dict[str, Any] = {"deterministic": True} if "deterministic" in params else {}
        if "action_masks" in params:  # sb3-contrib's MaskablePPO
            kwargs["action_masks"] = np.asarray(obs["action_mask"]).astype(bool)
        out = policy.predict(obs, **kwargs)
        return np.asarray(out[0] if isinstance(out, tuple) else out)
    if callable(policy):
        return np.asarray(policy(obs))
    raise TypeError("a policy has predict(obs) (SB3 style) or is a callable obs -> actions; "
                    f"got {type(policy).__name__}")


def varying_queries(env: TreeRetrievalVectorEnv) -> bool:
    """Whether the task's number of queries per context set changes from batch to batch (GP, images)."""
    return len({env.task.sample(1, torch.Generator().manual_seed(s)).M for s in range(8)}) > 1


def make_eval_env(env_id: str | None = None, num_envs: int = 1000, seed: int = 0,
                  env: TreeRetrievalVectorEnv | None = None, **env_kwargs: Any) -> TreeRetrievalVectorEnv:
    """The vector env an evaluation runs on (numpy arrays, as SB3 expects)."""
    if env is None:
        env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", seed=seed,
                           **env_kwargs)
    if varying_queries(env):
        # Lockstep rounds need whole batches: one context set at a time when M varies.
        env = TreeRetrievalVectorEnv(1, task=env.task, predictor=env.predictor, seed=seed, batch_size=1,
                                     reward=env.queries.reward_kind)
    return env


def evaluate(policy: Any | Callable[[dict[str, Any]], np.ndarray], env_id: str = "TreeRetrieval-v0",
             episodes: int = 10_000, seed: int = 0, num_envs: int = 1000,
             env: TreeRetrievalVectorEnv | None = None, **env_kwargs: Any) -> dict[str, float]:
    """Mean leaf reward (and task metric) of ``policy`` over the first ``episodes`` fixed-seed episodes.

    Args:
        policy: anything with SB3's ``predict(obs, deterministic=True)`` (SB3 and sb3-contrib models, the
            agents of :mod:`agents`), or a callable from a batch of observations to actions ``[n]``.
        env: evaluate on this vector env instead of a new ``env_id`` one (it is reset with ``seed``).
        env_kwargs: passed to ``gym.make_vec`` (e.g. ``predictor="fresh"``).

    Returns ``reward`` (mean), ``reward_ci95`` (half-width of the 95% interval), ``metric``, ``episodes``.
    """
    if episodes <= 0 or num_envs <= 0:
        raise ValueError(f"episodes and num_envs must be positive; got {episodes}, {num_envs}")
    env = make_eval_env(env_id, min(num_envs, episodes), seed, env, **env_kwargs)
    obs, _ = env.reset(seed=seed)
    rewards: list[np.ndarray] = []
    metrics: list[np.ndarray] = []
    done = 0
    while done < episodes:
        obs, r, term, _, info = env.step(_actions(policy, obs))
        if bool(np.asarray(term).all()):
            final = info["final_info"]
            rewards.append(np.asarray(r, dtype=np.float64).reshape(-1))
            metrics.append(np.asarray(final["metric"], dtype=np.float64).reshape(-1))
            done += rewards[-1].size
    rew = np.concatenate(rewards)[:episodes]
    met = np.concatenate(metrics)[:episodes]
    ci = 1.96 * rew.std(ddof=1) / math.sqrt(rew.size) if rew.size > 1 else float("nan")
    return {"reward": float(rew.mean()), "reward_ci95": float(ci), "metric": float(met.mean()),
            "episodes": int(rew.size)}
