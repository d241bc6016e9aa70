"""Does a task's leaf reward depend on the path? A check for task authors.

The environment is only a search problem if the reward at the leaf depends on which leaf the agent
reached. A task can break that without any error: if the query alone tells the predictor the answer
(a first version of a custom task let the predictor read the target from the query), every path
scores the same and an agent has nothing to learn. :func:`check_task` plays three fixed policies on
the same fixed-seed episodes with a *trained* predictor and compares their mean leaf reward:

* ``greedy``: the predictor's own attention policy (argmax), what the predictor was trained with;
* ``random``: a uniformly random real child at every level;
* ``leftmost``: always the first real child (one fixed leaf for every query).

If ``greedy`` does not beat ``random`` by a clear margin, the path does not matter (or the predictor
is untrained: a fresh predictor's reward ignores the path, which is why the check wants a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import search
from .evaluation import evaluate
from .model import ReTreever
from .tasks import Task
from .vector_env import TreeRetrievalVectorEnv

POLICIES = ("greedy", "random", "leftmost")


@dataclass
class PathCheck:
    """Mean leaf reward (and task metric) of each fixed policy, over the same episodes."""

    reward: dict[str, float]
    metric: dict[str, float]
    episodes: int
    margin: float

    @property
    def gap(self) -> float:
        """Greedy minus random mean reward."""
        return self.reward["greedy"] - self.reward["random"]

    @property
    def path_matters(self) -> bool:
        return self.gap >= self.margin

    def report(self) -> str:
        rows = [f"  {p:8s} reward {self.reward[p]:+.4f}   metric {self.metric[p]:+.4f}" for p in POLICIES]
        verdict = (f"the leaf reward depends on the path (greedy - random = {self.gap:+.4f} >= {self.margin})"
                   if self.path_matters else
                   f"WARNING: greedy - random = {self.gap:+.4f} < {self.margin}: the reward barely depends on the "
                   "path. Either the predictor is untrained, or the task lets it answer without the retrieved "
                   "tokens (e.g. the query carries the target): an agent would have nothing to learn.")
        return f"{self.episodes} episodes per policy\n" + "\n".join(rows) + "\n" + verdict + "\n"


@torch.no_grad()
def predictor_policy(model: ReTreever, query_emb: torch.Tensor, child_emb: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """The predictor's own search policy from an observation, as probabilities ``[E, b]``
    (:func:`tca_env.search.observed_log_probs` with the predictor's read-out)."""
    return search.observed_log_probs(model.readout, query_emb, child_emb, mask).exp()


def check_task(task: str | Task, predictor: ReTreever | str | Path | None,
               task_options: dict[str, Any] | None = None, episodes: int = 2048, num_envs: int = 512, seed: int = 0,
               margin: float = 0.05, device: str | torch.device | None = None) -> PathCheck:
    """Play ``greedy``, ``random`` and ``leftmost`` on the same ``episodes`` fixed-seed episodes each
    (:func:`tca_env.evaluation.evaluate`, the package's one evaluation protocol).

    Args:
        predictor: a trained :class:`~tca_env.model.ReTreever`, a checkpoint path, ``"pretrained:<name>"``,
            or None (a fresh predictor: its reward ignores the path, which the check then reports).
        margin: the greedy-minus-random reward gap below which the path is judged not to matter.
    """
    if episodes <= 0 or num_envs <= 0:
        raise ValueError(f"episodes and num_envs must be positive; got {episodes}, {num_envs}")
    env = TreeRetrievalVectorEnv(min(num_envs, episodes), task=task, task_options=task_options, predictor=predictor,
                                 device=device, seed=seed)
    model = env.predictor
    rng = np.random.default_rng(seed + 1)

    def greedy(obs: dict[str, Any]) -> np.ndarray:
        t = {k: torch.as_tensor(v, device=env.device) for k, v in obs.items()}
        return predictor_policy(model, t["query_emb"], t["child_emb"], t["action_mask"].bool()).argmax(-1).cpu().numpy()

    def random(obs: dict[str, Any]) -> np.ndarray:
        mask = np.asarray(obs["action_mask"]).astype(bool)
        return np.where(mask, rng.random(mask.shape), -1.0).argmax(-1)

    def leftmost(obs: dict[str, Any]) -> np.ndarray:
        return np.asarray(obs["action_mask"]).astype(bool).argmax(-1)

    reward: dict[str, float] = {}
    metric: dict[str, float] = {}
    for name, policy in (("greedy", greedy), ("random", random), ("leftmost", leftmost)):
        out = evaluate(policy, episodes=episodes, seed=seed, env=env)
        reward[name], metric[name] = out["reward"], out["metric"]
        n = out["episodes"]
    return PathCheck(reward, metric, n, margin)
