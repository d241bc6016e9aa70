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
    """The predictor's own search policy from an observation: ``query_emb [E, D]``, ``child_emb [E, b, D]``,
    ``mask [E, b]`` -> pi(child) ``[E, b]`` (each head's softmax over the children, averaged over heads)."""
    q = model.readout.queries(query_emb).unsqueeze(1)  # [E, 1, H, dh]
    k, _ = model.readout.keys_values(child_emb)  # [E, b, H, dh]
    scores = (k.unsqueeze(1) * q.unsqueeze(2)).sum(-1)  # [E, 1, b, H]
    m = None if mask is None else mask.unsqueeze(1)
    return search.policy_log_probs(search.head_probs(scores, m), m).exp().squeeze(1)


def check_task(task: str | Task, predictor: ReTreever | str | Path, task_options: dict[str, Any] | None = None,
               episodes: int = 2048, num_envs: int = 512, seed: int = 0, margin: float = 0.05,
               device: str | torch.device | None = None) -> PathCheck:
    """Play ``greedy``, ``random`` and ``leftmost`` on the same ``episodes`` fixed-seed episodes each.

    Args:
        predictor: a trained :class:`~tca_env.model.ReTreever` or a checkpoint path.
        margin: the greedy-minus-random reward gap below which the path is judged not to matter.
    """
    if episodes <= 0 or num_envs <= 0:
        raise ValueError(f"episodes and num_envs must be positive; got {episodes}, {num_envs}")
    num_envs = min(num_envs, episodes)
    batch_size = None
    probe = TreeRetrievalVectorEnv(1, task=task, task_options=task_options, predictor=predictor, device=device)
    if len({probe.task.sample(1, torch.Generator().manual_seed(s)).M for s in range(8)}) > 1:
        # The number of queries varies per batch (GP, images): lockstep rounds need one context set at a time.
        num_envs, batch_size = 1, 1
    task, predictor = probe.task, probe.predictor
    rounds = -(-episodes // num_envs)
    reward: dict[str, float] = {}
    metric: dict[str, float] = {}
    for policy in POLICIES:
        env = TreeRetrievalVectorEnv(num_envs, task=task, predictor=predictor, device=device, seed=seed,
                                     batch_size=batch_size, array_type="torch")
        rng = np.random.default_rng(seed + 1)
        rewards, metrics = [], []
        env.reset(seed=seed)
        for _ in range(rounds):
            done = False
            while not done:
                q = env.queries
                mask = q.mask
                if policy == "greedy":
                    action = predictor_policy(env.predictor, q.query_emb, q.child_emb, mask).argmax(-1)
                elif policy == "leftmost":
                    action = mask.to(torch.uint8).argmax(-1)
                else:
                    u = torch.from_numpy(rng.random(tuple(mask.shape))).to(mask.device)
                    action = u.masked_fill(~mask, -1.0).argmax(-1)
                _, r, term, _, info = env.step(action)
                done = bool(term.all())
            final = info["final_info"]
            rewards.append(r.double().cpu())
            metrics.append(final["metric"].double().cpu())
        reward[policy] = float(torch.cat(rewards)[:episodes].mean())
        metric[policy] = float(torch.cat(metrics)[:episodes].mean())
        env.close()
    return PathCheck(reward, metric, rounds * num_envs if rounds * num_envs < episodes else episodes, margin)
