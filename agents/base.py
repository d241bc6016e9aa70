"""The interface through which the co-trainer (``training.cotrain.CoTrainer``) drives a search agent.

An agent acts on the environment's observations, may add a REINFORCE term to the predictor's update on the
replay of its paths (the paper's shared attention policy), takes its own step after each tree batch, and
saves and loads itself with the trainer's checkpoint. :class:`StepwiseAgent` gives the defaults and the loop
for agents the trainer steps one tree batch at a time; Stable-Baselines3 algorithms, which own their loop,
come wrapped in :class:`agents.sb3.SB3Agent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from tca_env import search

if TYPE_CHECKING:
    from training.cotrain import CoTrainer


@dataclass
class Rollout:
    """One tree batch descended by an agent: every env slot took ``steps`` actions.

    ``log_prob`` and ``entropy`` (``[E]``, summed over the steps) exist for agents whose ``act`` returns the
    policy's log-probabilities (None otherwise); ``reward`` ``[E]`` is the leaf reward.
    """

    log_prob: torch.Tensor | None
    entropy: torch.Tensor | None
    reward: torch.Tensor
    steps: int


class Agent(Protocol):
    """What the co-trainer needs of a search agent."""

    def act(self, obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Actions ``[E]`` for a batch of observations, and the policy's log-probabilities ``[E, b]`` (None
        for an agent without a policy gradient)."""

    def replay_loss(self, log_prob: torch.Tensor, entropy: torch.Tensor,
                    reward: torch.Tensor) -> torch.Tensor | None:
        """A term for the predictor's loss on the replay of the agent's paths (path log-probabilities,
        entropies and rewards, ``[B, M]``), or None."""

    def update(self, rollout: Rollout, clip: float | None) -> dict[str, float]:
        """The agent's own learning step after a tree batch; scalars to log (``agent/...``)."""

    def eval_policy(self, seed: int) -> Any:
        """What evaluation acts with (an SB3-style ``predict``), a fixed function of the checkpoint."""

    def save(self, path: Path) -> dict[str, Any]:
        """The agent's entry of the checkpoint written to ``path`` (it may write files beside it, atomically)."""

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        """Restore from the entry :meth:`save` returned for the checkpoint at ``path``."""

    def run(self, trainer: CoTrainer) -> None:
        """Co-train until the trainer's predictor has had its ``cfg.steps`` updates."""


class StepwiseAgent:
    """Defaults for agents the co-trainer steps one tree batch at a time (SB3-style ``predict`` to act, nothing
    added to the predictor's loss, nothing to learn, state saved inside the checkpoint)."""

    def predict(self, obs: dict[str, Any], state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, None]:
        raise NotImplementedError

    def act(self, obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.as_tensor(self.predict(obs)[0]), None

    def replay_loss(self, log_prob: torch.Tensor, entropy: torch.Tensor,
                    reward: torch.Tensor) -> torch.Tensor | None:
        return None

    def update(self, rollout: Rollout, clip: float | None) -> dict[str, float]:
        return {}

    def eval_policy(self, seed: int) -> Any:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save(self, path: Path) -> dict[str, Any]:
        return {"state": self.state_dict()}

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        self.load_state_dict(saved["state"])

    def run(self, trainer: CoTrainer) -> None:
        """The loop: descend a tree batch, update the predictor on its replay, then the agent."""
        while trainer.step < trainer.cfg.steps:
            fb, rollout = trainer.rollout()
            stats = trainer.learn_from(fb)
            if rollout.entropy is not None:
                stats["agent/entropy"] = float(rollout.entropy.mean()) / rollout.steps
            stats.update(self.update(rollout, trainer.cfg.clip))
            trainer.after_step(stats)


def play_episodes(agent: Agent, env: Any, obs: dict[str, Any]) -> tuple[dict[str, Any], Rollout]:
    """``agent`` plays the current episodes of a lockstep vector env (all slots end on the same step) from
    observations ``obs``; returns the next observations and the :class:`Rollout` (path log-probabilities and
    entropies summed over the steps when the agent returns its policy)."""
    steps, log_prob, entropy = 0, None, None
    while True:
        action, logp = agent.act(obs)
        if logp is not None:
            chosen = logp.gather(-1, action.unsqueeze(-1)).squeeze(-1)
            log_prob = chosen if log_prob is None else log_prob + chosen
            ent = search.entropy(logp)
            entropy = ent if entropy is None else entropy + ent
        obs, reward, terminated, _, _ = env.step(action)
        steps += 1
        if bool(np.asarray(terminated).all()):
            break
    return obs, Rollout(log_prob, entropy, torch.as_tensor(reward, dtype=torch.float32), steps)
