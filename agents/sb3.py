"""Stable-Baselines3 on TreeRetrieval: a native VecEnv adapter, a child-attention feature extractor, agents by name.

    venv = TreeRetrievalVectorEnv(num_envs=1024, task="copy", task_options={"seq_len": 128})
    agent = make_agent("maskable_ppo", venv)     # or "ppo", "a2c", "dqn", "reinforce", "random"
    agent.learn(100_000)

:class:`SB3VecEnv` hands SB3 the whole lockstep batch at once (numpy at the boundary, same-step autoreset
with ``terminal_observation``), instead of SB3's DummyVecEnv looping over one env per query.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from sb3_contrib import MaskablePPO
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from tca_env.env import TreeRetrievalEnv
from tca_env.vector_env import TreeRetrievalVectorEnv

from . import AGENT_NAMES
from .attention import AttentionPolicy, ReinforceAgent, obs_to_torch
from .base import StepwiseAgent

# ------------------------------------------------------------------------------------------- VecEnv


class SB3VecEnv(VecEnv):
    """SB3's ``VecEnv`` over a :class:`TreeRetrievalVectorEnv`, natively batched.

    * Observations, rewards and dones are the vector env's numpy arrays; SB3's per-env ``infos`` list
      carries ``terminal_observation`` (and SB3's ``episode`` statistics) when the episodes end.
    * ``seed(s)``: the next ``reset`` seeds the lockstep env with ``s`` (one generator drives every slot,
      so only the first of SB3's per-env seeds is used).
    * ``env_method(name)`` calls the vector env's method once; an array result with one row per env is
      split into rows, so ``env_method("action_masks")`` gives MaskablePPO its per-env masks.
    """

    def __init__(self, venv: TreeRetrievalVectorEnv):
        if not isinstance(venv, TreeRetrievalVectorEnv):
            raise TypeError(f"SB3VecEnv wraps a TreeRetrievalVectorEnv; got {type(venv).__name__}")
        if venv.autoreset_mode != AutoresetMode.SAME_STEP or venv.array_type != "numpy":
            raise ValueError("SB3VecEnv needs autoreset_mode=SAME_STEP and array_type='numpy' (SB3's conventions)")
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None
        self._episode_start = time.perf_counter()
        self._episode_steps = 0

    def reset(self):
        seed = self._seeds[0]
        options = self._options[0] or None
        obs, _ = self.venv.reset(seed=seed, options=options)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        self._episode_start, self._episode_steps = time.perf_counter(), 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, reward, terminated, truncated, info = self.venv.step(self._actions)
        self._episode_steps += 1
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():  # the lockstep episodes end together
            elapsed = round(time.perf_counter() - self._episode_start, 6)
            for i, (d, final) in enumerate(zip(infos, info["final_obs"], strict=True)):
                d["terminal_observation"] = final
                d["episode"] = {"r": float(reward[i]), "l": self._episode_steps, "t": elapsed}
                d["TimeLimit.truncated"] = False
            self._episode_start, self._episode_steps = time.perf_counter(), 0
        return obs, reward.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def _indices(self, indices) -> list[int]:
        return list(self._get_indices(indices))

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        value = getattr(self.venv, attr_name)
        return [value] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.venv, attr_name, value)  # one env behind every slot

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        idx = self._indices(indices)
        if isinstance(result, np.ndarray) and result.ndim >= 1 and result.shape[0] == self.num_envs:
            return list(result[idx])
        return [result] * len(idx)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices=None) -> list[bool]:
        return [False] * len(self._indices(indices))

    def action_masks(self) -> np.ndarray:
        return self.venv.action_masks()


# ------------------------------------------------------------------------------ feature extractor


class ChildAttentionExtractor(BaseFeaturesExtractor):
    """The query attends over the children: per-child, per-head scores in child order, plus a pooled summary.

    Features = ``[scores (b x H), mask (b), attention-pooled children (d_attn)]``. The score block is
    equivariant to permuting the children and keeps child c in slot c, so the action head can map child
    c's scores to the logit of action c; the pooled block (invariant) feeds the value function. The
    query is conditioned on the depth (one-hot, as SB3 preprocesses a Discrete entry).

    Args:
        d_attn: width of the query/key/value projections.
        nhead: attention heads.
    """

    def __init__(self, observation_space: spaces.Dict, d_attn: int = 64, nhead: int = 4):
        if d_attn % nhead:
            raise ValueError(f"d_attn {d_attn} is not divisible by nhead {nhead}")
        d = observation_space["query_emb"].shape[0]
        b = observation_space["child_emb"].shape[0]
        super().__init__(observation_space, features_dim=b * nhead + b + d_attn)
        self.nhead, self.dh = nhead, d_attn // nhead
        self.query = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d_attn))
        self.depth = nn.Linear(observation_space["depth"].n, d_attn, bias=False)
        self.key_value = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d_attn))

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        n, b = obs["child_emb"].shape[:2]
        depth = obs["depth"].reshape(n, -1)  # one-hot; replay buffers keep a trailing axis
        q = (self.query(obs["query_emb"]) + self.depth(depth)).view(n, 1, self.nhead, self.dh)
        k, v = self.key_value(obs["child_emb"]).view(n, b, 2, self.nhead, self.dh).unbind(2)  # [n, b, H, dh]
        scores = (q * k).sum(-1) * self.dh**-0.5  # [n, b, H]
        mask = obs["action_mask"]  # [n, b] float
        attn = scores.masked_fill(mask.unsqueeze(-1) < 0.5, -torch.finfo(scores.dtype).max).softmax(1)
        pooled = (attn.unsqueeze(-1) * v).sum(1).flatten(1)  # [n, d_attn]
        return torch.cat([scores.flatten(1), mask, pooled], dim=1)


# ------------------------------------------------------------------------------------------- agents


class RandomAgent(StepwiseAgent):
    """The floor: a uniformly random real child at every step (SB3-style ``predict``; nothing to learn)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def predict(self, obs: dict[str, Any], state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, None]:
        mask = obs["action_mask"]
        mask = (mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).astype(bool)  # [n, b]
        # The largest of i.i.d. uniforms is equally likely to sit on any real child.
        return np.where(mask, self.rng.random(mask.shape), -1.0).argmax(-1), None

    def eval_policy(self, seed: int) -> RandomAgent:
        """Evaluation draws its own seeded choices, so it is a fixed function of the checkpoint."""
        return RandomAgent(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class PredictorAgent(StepwiseAgent):
    """The predictor's own greedy attention policy as an agent (the argmax of its read-out attention over the
    children; SB3-style ``predict``, nothing to learn): the reference that scores are normalised against."""

    def __init__(self, predictor: Any):
        self.policy = AttentionPolicy(predictor.readout)
        self.device = next(predictor.parameters()).device

    @torch.no_grad()
    def predict(self, obs: dict[str, Any], state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        o = obs_to_torch(obs, self.device)
        return self.policy(o["query_emb"], o["child_emb"], o["action_mask"]).argmax(-1).cpu().numpy(), None


class CorrectLeafAgent(StepwiseAgent):
    """The oracle where a task knows each query's target token (the copy task): the child on the way to the leaf
    that holds it. It reads the env's current queries, so it acts only on the env it was made for."""

    def __init__(self, env: TreeRetrievalVectorEnv):
        if env.task.target_tokens(env.task.sample(1, torch.Generator().manual_seed(0))) is None:
            raise ValueError(f"task {env.task.name!r} does not know its queries' target tokens: no correct leaf")
        self.env = env

    def predict(self, obs: dict[str, Any], state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        return self.env.queries.correct_actions().cpu().numpy(), None


SB3_ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "dqn": DQN, "maskable_ppo": MaskablePPO}
if set(AGENT_NAMES) != {"reinforce", "random", *SB3_ALGORITHMS}:
    raise ImportError("agents.AGENT_NAMES and agents.sb3.SB3_ALGORITHMS disagree")
#: agents that only act (evaluation references), not offered for co-training
REFERENCE_AGENTS = ("predictor", "correct_leaf")


def _vector_env(env: Any) -> TreeRetrievalVectorEnv | None:
    if isinstance(env, SB3VecEnv):
        return env.venv
    return env if isinstance(env, TreeRetrievalVectorEnv) else None


def _tree_env(env: Any) -> TreeRetrievalVectorEnv | TreeRetrievalEnv:
    venv = _vector_env(env)
    if venv is not None:
        return venv
    inner = getattr(env, "unwrapped", None)
    if isinstance(inner, TreeRetrievalEnv):
        return inner
    raise TypeError(f"expected a TreeRetrieval env (single, vector or SB3VecEnv); got {type(env).__name__}")


def _minibatch(total: int, target: int = 1024) -> int:
    """The largest divisor of ``total`` not above ``target`` among total/1, total/2, ... (no ragged last batch)."""
    parts = math.ceil(total / target)
    while total % parts:
        parts += 1
    return total // parts


def sb3_defaults(name: str, num_envs: int, depth: int) -> dict[str, Any]:
    """Defaults for co-training on TreeRetrieval: gamma = 1 (the reward is the leaf's metric), one tree
    batch (``depth`` steps of every env) per rollout, the child-attention extractor, and an entropy bonus of
    0.05 for the policy-gradient algorithms: with PPO's normalised advantages, 0.01 (the paper's) let the
    policy collapse onto arbitrary paths while the rewards were still noise (before the predictor's full
    attention learns the copy task), and with 0/1 accuracy rewards some subtrees then never recovered."""
    policy_kwargs: dict[str, Any] = {"features_extractor_class": ChildAttentionExtractor,
                                     "features_extractor_kwargs": {"d_attn": 64, "nhead": 4}}
    out: dict[str, Any] = {"policy": "MultiInputPolicy", "gamma": 1.0, "verbose": 0}
    if name in ("ppo", "maskable_ppo"):
        policy_kwargs["net_arch"] = {"pi": [64], "vf": [64]}
        out.update(n_steps=depth, batch_size=_minibatch(depth * num_envs), n_epochs=4, learning_rate=3e-4,
                   gae_lambda=0.95, ent_coef=0.05)
    elif name == "a2c":
        policy_kwargs["net_arch"] = {"pi": [64], "vf": [64]}
        out.update(n_steps=depth, learning_rate=7e-4, ent_coef=0.05)
    elif name == "dqn":
        policy_kwargs["net_arch"] = [64]
        out.update(buffer_size=100_000, learning_starts=depth * num_envs, batch_size=256, train_freq=(depth, "step"),
                   gradient_steps=2 * depth, target_update_interval=max(1, 20 * depth * num_envs),
                   exploration_fraction=0.2, exploration_final_eps=0.02, learning_rate=3e-4)
    out["policy_kwargs"] = policy_kwargs
    return out


def make_agent(name: str, env: Any, **kwargs: Any) -> Any:
    """An agent by name, SB3-style (``policy_aliases``): ``"reinforce"``, ``"random"``, ``"ppo"``, ``"a2c"``,
    ``"dqn"``, ``"maskable_ppo"``, and ``"predictor"`` (the env predictor's own greedy policy; acts only).

    Args:
        env: a :class:`TreeRetrievalVectorEnv` (wrapped in :class:`SB3VecEnv` for SB3 algorithms), an
            :class:`SB3VecEnv`, or a single :class:`TreeRetrievalEnv` (SB3 then wraps it itself).
        kwargs: constructor arguments of the agent, over :func:`sb3_defaults` for SB3 algorithms
            (``policy_kwargs`` are merged key by key); :class:`~agents.attention.ReinforceAgent`'s for
            "reinforce" (its predictor is the env's); ``seed`` for "random".
    """
    if name not in AGENT_NAMES + REFERENCE_AGENTS:
        raise ValueError(f"unknown agent {name!r}; choose one of {AGENT_NAMES + REFERENCE_AGENTS}")
    tree_env = _tree_env(env)
    if name == "predictor":
        return PredictorAgent(tree_env.predictor)
    if name == "correct_leaf":
        venv = _vector_env(env)
        if venv is None:
            raise ValueError("the correct-leaf oracle reads a TreeRetrievalVectorEnv's queries; pass one")
        return CorrectLeafAgent(venv)
    if name == "reinforce":
        return ReinforceAgent(tree_env.predictor, **kwargs)
    if name == "random":
        return RandomAgent(**kwargs)
    venv = _vector_env(env)
    num_envs = venv.num_envs if venv is not None else 1
    if venv is not None and not isinstance(env, SB3VecEnv):
        env = SB3VecEnv(venv)
    params = sb3_defaults(name, num_envs, tree_env.queries.k_max)
    policy_kwargs = {**params.pop("policy_kwargs"), **kwargs.pop("policy_kwargs", {})}
    params.update(kwargs)
    params.setdefault("device", tree_env.queries.device)
    return SB3_ALGORITHMS[name](env=env, policy_kwargs=policy_kwargs, **params)


def predict(agent: Any, obs: dict[str, Any], deterministic: bool = True) -> np.ndarray:
    """Actions of any agent for a batch of observations (MaskablePPO also gets the observed action masks)."""
    if isinstance(agent, MaskablePPO):
        masks = np.asarray(obs["action_mask"]).astype(bool)
        return agent.predict(obs, action_masks=masks, deterministic=deterministic)[0]
    return agent.predict(obs, deterministic=deterministic)[0]



# ---------------------------------------------------------------------------------- co-training adapter

class SB3Agent(StepwiseAgent):
    """A Stable-Baselines3 / sb3-contrib algorithm in the co-training loop (the :class:`agents.base.Agent`
    interface; nothing added to the predictor's loss, no step of its own outside ``learn``). SB3 owns the loop
    (``learn``); at each rollout end (one rollout = one tree batch) a callback updates the predictor on every
    finished batch and logs, and SB3's own scalars go to the trainer's TensorBoard run under ``agent/...``.
    The algorithm is saved as its own zip beside the checkpoint."""

    def __init__(self, algo: BaseAlgorithm):
        self.algo = algo

    def predict(self, obs: dict[str, Any], state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, None]:
        return predict(self.algo, obs, deterministic=deterministic), None

    def eval_policy(self, seed: int) -> BaseAlgorithm:
        return self.algo

    def run(self, trainer: Any) -> None:
        algo, env = self.algo, trainer.env
        algo.set_logger(Logger(folder=None, output_formats=[_AgentScalars(trainer)]))
        per_batch = env.num_envs * env.queries.k_max
        # Upper bound on env steps: the callback stops learning once the predictor has had its updates.
        total = 2 * (trainer.cfg.steps - trainer.step + 1) * per_batch
        log_interval = env.num_envs if isinstance(algo, DQN) else 1  # off-policy counts episodes
        algo.learn(total_timesteps=total, callback=_PredictorUpdate(trainer), log_interval=log_interval,
                   reset_num_timesteps=trainer.step == 0)

    def save(self, path: Path) -> dict[str, Any]:
        """Write the algorithm to ``<checkpoint stem>.agent.zip`` beside ``path`` (temp file + rename)."""
        name = f"{path.stem}.agent.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".zip", dir=path.parent)
        os.close(fd)
        try:
            self.algo.save(tmp)
            os.replace(tmp, path.parent / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return {"file": name}

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        file = Path(path).parent / saved["file"]
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} needs its agent file {file}")
        self.algo = type(self.algo).load(file, env=self.algo.get_env(), device=self.algo.device)


def cotrain_agent(agent: Any) -> Any:
    """``agent`` (from :func:`make_agent`) as the co-trainer drives it: SB3 algorithms wrapped in :class:`SB3Agent`."""
    return SB3Agent(agent) if isinstance(agent, BaseAlgorithm) else agent


class _PredictorUpdate(BaseCallback):
    """Steps 3 and 4 of the loop for SB3 agents: at each rollout end, update the predictor on every finished
    tree batch; stop learning once the predictor has had ``steps`` updates."""

    def __init__(self, trainer: Any):
        super().__init__()
        self.trainer = trainer

    def _on_step(self) -> bool:
        return self.trainer.step < self.trainer.cfg.steps

    def _on_rollout_end(self) -> None:
        t = self.trainer
        for fb in t.env.pop_finished():
            if t.step < t.cfg.steps:
                t.after_step(t.learn_from(fb))


class _AgentScalars(KVWriter):
    """SB3's logger output into the co-trainer's TensorBoard run, as ``agent/<key>`` at the predictor's step.

    Adds ``agent/entropy``: minus PPO/A2C's entropy loss, or the entropy of DQN's epsilon-greedy policy.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        writer, at = self.trainer.writer, self.trainer.step
        for key, value in key_values.items():
            excluded = key_excluded.get(key) or ()
            if "tensorboard" in excluded or isinstance(value, (str, bool)) or not np.isscalar(value):
                continue
            writer.add_scalar(f"agent/{key}", float(value), at)
        if "train/entropy_loss" in key_values:
            writer.add_scalar("agent/entropy", -float(key_values["train/entropy_loss"]), at)
        if "rollout/exploration_rate" in key_values:
            eps, b = float(key_values["rollout/exploration_rate"]), self.trainer.env.queries.b
            p = np.array([1 - eps + eps / b] + [eps / b] * (b - 1))
            writer.add_scalar("agent/entropy", float(-(p * np.log(np.maximum(p, 1e-12))).sum()), at)

    def close(self) -> None:
        pass
