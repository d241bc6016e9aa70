"""The paper's search policy, the attention of the query over the children, trained by REINFORCE.

pi(c | query, children) = mean_h softmax_c <W_q LN(query)_h, W_k child_c_h> / sqrt(dh): each head's softmax
over the children's (raw, un-normalised) embeddings, averaged over heads.
By default the policy *is* the predictor's read-out attention (``shared=True``, as in the paper): acting
on the env's observations then gives exactly the probabilities of the fused search, and its REINFORCE
term is computed on the predictor's differentiable replay of the agent's actions, so the gradient
reaches the tree's internal nodes. A standalone policy (``shared=False``) owns a copy of the read-out,
sees only the detached observations and learns from the env's rewards with its own optimizer.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from tca_env import search
from tca_env.model import BASELINES, ReadOut, ReTreever

from .base import Rollout, StepwiseAgent


class AttentionPolicy(nn.Module):
    """Log-probabilities ``[n, b]`` of the children from an observation batch, with a read-out's weights."""

    def __init__(self, readout: ReadOut):
        super().__init__()
        self.readout = readout

    def forward(self, query_emb: torch.Tensor, child_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``query_emb [n, D]``, ``child_emb [n, b, D]``, ``mask [n, b]`` -> log pi ``[n, b]`` (masked: -inf)."""
        return search.observed_log_probs(self.readout, query_emb, child_emb, mask)


def obs_to_torch(obs: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v, device=device)
            for k, v in obs.items()}


class ReinforceAgent(StepwiseAgent):
    """REINFORCE on the attention policy: loss = -(sum_s log pi(a_s)) (R - baseline) - entropy_coef * H.

    Args:
        predictor: the ReTreever whose read-out attention is the policy (shared) or is copied (standalone).
        shared: share the predictor's read-out (the paper) rather than train a copy of it.
        lr: Adam learning rate of a standalone policy (a shared one is stepped with the predictor).
        entropy_coef: weight of the entropy bonus (paper: 0.01).
        baseline: ``"none"``, ``"batch_mean"`` or ``"ema"`` (moving average of the reward, decay ``ema_decay``).
        seed: seed of the generator that samples actions.
    """

    def __init__(self, predictor: ReTreever, shared: bool = True, lr: float = 5e-4, entropy_coef: float = 0.01,
                 baseline: str = "none", ema_decay: float = 0.99, seed: int = 0):
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1); got {ema_decay}")
        self.shared, self.entropy_coef, self.baseline, self.ema_decay = shared, entropy_coef, baseline, ema_decay
        readout = predictor.readout if shared else copy.deepcopy(predictor.readout)
        self.policy = AttentionPolicy(readout)
        self.device = next(predictor.parameters()).device
        self.optimizer = None if shared else torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.reward_ema = torch.zeros((), device=self.device)
        self.generator = torch.Generator().manual_seed(seed)

    def act(self, obs: dict[str, Any], deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions ``[n]`` and the policy's log-probabilities ``[n, b]``: differentiable (when grad is on) for a
        standalone policy, which learns from them; a shared one learns on the predictor's replay instead."""
        o = obs_to_torch(obs, self.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.shared):
            logp = self.policy(o["query_emb"], o["child_emb"], o["action_mask"])
        return search.choose(logp, "greedy" if deterministic else "sample", self.generator), logp

    @torch.no_grad()
    def predict(self, obs: dict[str, Any], state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, None]:
        """SB3-style ``predict`` on a batch of observations."""
        return self.act(obs, deterministic)[0].cpu().numpy(), None

    def advantage(self, reward: torch.Tensor) -> torch.Tensor:
        """Reward minus the baseline; the "ema" baseline moves after it is used (as the fused model's)."""
        return search.advantage(reward, self.baseline, self.reward_ema, self.ema_decay)

    def loss(self, log_prob: torch.Tensor, entropy: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
        """REINFORCE with entropy bonus from path log-probs, path entropies and rewards (all ``[...]``): the
        fused step's definition (:func:`tca_env.search.reinforce_loss`)."""
        adv = self.advantage(reward.detach())
        return search.reinforce_loss(log_prob, entropy, adv, self.entropy_coef)

    def replay_loss(self, log_prob: torch.Tensor, entropy: torch.Tensor, reward: torch.Tensor) -> torch.Tensor | None:
        """A shared policy's REINFORCE term, on the predictor's differentiable replay (the fused step's L_RL)."""
        return self.loss(log_prob, entropy, reward) if self.shared else None

    def update(self, rollout: Rollout, clip: float | None = 1.0) -> dict[str, float]:
        """One optimizer step of a standalone policy on a rollout's path log-probabilities (a shared policy
        learned in the predictor's update: nothing to do)."""
        if self.optimizer is None:
            return {}
        loss = self.loss(rollout.log_prob, rollout.entropy, rollout.reward)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip)
        self.optimizer.step()
        return {"agent/loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"shared": self.shared, "entropy_coef": self.entropy_coef, "baseline": self.baseline,
                "ema_decay": self.ema_decay, "reward_ema": float(self.reward_ema),
                "generator": self.generator.get_state(),
                "policy": None if self.shared else self.policy.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shared"] != self.shared:
            raise ValueError(f"saved agent has shared={state['shared']}, this one shared={self.shared}")
        self.entropy_coef, self.baseline, self.ema_decay = state["entropy_coef"], state["baseline"], state["ema_decay"]
        self.reward_ema = torch.tensor(float(state["reward_ema"]), device=self.device)
        self.generator.set_state(state["generator"])
        if not self.shared:
            self.policy.load_state_dict(state["policy"])
            self.optimizer.load_state_dict(state["optimizer"])
