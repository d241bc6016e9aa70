"""TreeRetrievalVectorEnv: many queries of TreeRetrieval-v0 descending their trees in lockstep.

Each of the ``num_envs`` slots is one query. All slots step together with tensor operations on one
device (no Python loop over envs): one :func:`tca_env.search.step` per level for the whole round, one
``predict_path`` for all leaves. Every episode of a tree batch has the same length k, so the slots
finish together; the next round of queries (or the next sampled batch) then starts in every slot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .env import TreeQueries, build_task_and_predictor, observation_space
from .model import ReTreever
from .tasks import Batch, Task

ARRAY_TYPES = ("numpy", "torch")


class TreeRetrievalVectorEnv(VectorEnv):
    """``num_envs`` copies of :class:`~tca_env.env.TreeRetrievalEnv`, stepped as one batch of tensors.

    ``gym.make_vec("TreeRetrieval-v0", num_envs=E, vectorization_mode="vector_entry_point", ...)`` builds
    it with the keyword arguments of the single env plus the ones below. A tree batch holds B context
    sets of M queries; B defaults to the fewest that make B*M a multiple of E (B = E/M when M divides E),
    and its B*M queries are served in B*M/E rounds of E consecutive queries (query ``b*M + m``), so with
    ``num_envs=1`` the slot sees exactly the episodes of the single env with ``batch_size=1``.

    Args:
        num_envs: parallel queries E.
        autoreset_mode: ``AutoresetMode.SAME_STEP`` (default: the step that ends the episodes returns the
            next episodes' first observations, the final ones in ``info["final_obs"]`` and their infos in
            ``info["final_info"]``), ``NEXT_STEP`` (the step after the end returns the new observations,
            ignores its actions and gives reward 0) or ``DISABLED`` (call ``reset()`` after the end; a
            ``reset_mask`` must select every env, since all episodes end together).
        array_type: ``"numpy"`` (default) or ``"torch"``: observations, rewards, flags and infos as torch
            tensors on the env's device (no copy to numpy); actions may be either.
        batch_size: context sets per tree batch (B*M must be a multiple of ``num_envs``).
        record_batches: keep every finished tree batch (its Batch, actions, rewards) for
            :meth:`pop_finished`: how a co-trainer learns which paths to replay.
        (others): as :class:`~tca_env.env.TreeRetrievalEnv`.

    ``reset(seed=...)`` samples a new batch from that seed; ``reset()`` starts the next round;
    ``reset(options={"batch": batch})`` serves a given batch. The predictor runs in eval mode under
    ``no_grad``; if it is trained meanwhile, the trees of the current batch keep the weights they were built
    with and the next batch uses the new ones.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, task: str | Task | None = None, task_options: dict[str, Any] | None = None,
                 predictor: ReTreever | str | Path | None = None, branch: int | None = None,
                 reward: str | None = None, device: str | torch.device | None = None, seed: int | None = None,
                 invalid_action: str = "redirect", batch_size: int | None = None,
                 model_options: dict[str, Any] | None = None,
                 autoreset_mode: str | AutoresetMode = AutoresetMode.SAME_STEP, array_type: str = "numpy",
                 record_batches: bool = False, render_mode: str | None = None):
        if render_mode is not None:
            raise ValueError("TreeRetrievalVectorEnv does not render; use TreeRetrievalEnv(render_mode='ansi')")
        if array_type not in ARRAY_TYPES:
            raise ValueError(f"unknown array_type {array_type!r}; choose one of {ARRAY_TYPES}")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.task, self.predictor = build_task_and_predictor(task, task_options, predictor, branch, device, seed,
                                                             model_options)
        self.queries = TreeQueries(self.task, self.predictor, num_envs, batch_size, reward, invalid_action,
                                   record_batches)
        self.num_envs, self.array_type = num_envs, array_type
        q = self.queries
        self.single_observation_space = observation_space(self.predictor.cfg.d_model, q.b, q.k_max)
        self.single_action_space = spaces.Discrete(q.b)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.render_mode = None
        self._first_seed = seed
        self._ended = False  # the last step ended the episodes (NEXT_STEP / DISABLED bookkeeping)

    @property
    def device(self) -> torch.device:
        return self.queries.device

    # ------------------------------------------------------------------------------------- API

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]  # one generator drives every slot of the lockstep batch
        if seed is None and self._first_seed is not None and self._np_random is None:
            seed = self._first_seed
        super().reset(seed=seed)
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if mask is not None and not bool(np.all(np.asarray(mask))):
            raise ValueError("the episodes of TreeRetrievalVectorEnv run in lockstep: reset_mask must select every "
                             "env (they all end on the same step)")
        self.queries.start(options, seed, self.np_random)
        self._ended = False
        return self._obs(), {}

    def step(self, actions):
        q = self.queries
        if self._ended:
            if self.autoreset_mode == AutoresetMode.DISABLED:
                raise ResetNeeded("the episodes ended on the last step and autoreset is disabled: call reset()")
            # NEXT_STEP: this step only starts the next episodes; its actions are ignored.
            q.next_round(self.np_random)
            self._ended = False
            return self._obs(), self._reward(None), self._flags(False), self._flags(False), {}
        reward, info = q.step(torch.as_tensor(actions))
        if reward is None:
            return self._obs(), self._reward(None), self._flags(False), self._flags(False), self._info(info)
        if self.autoreset_mode != AutoresetMode.SAME_STEP:
            self._ended = True
            return self._obs(), self._reward(reward), self._flags(True), self._flags(False), self._info(info)
        final = {"final_obs": self._split(self._obs()), "_final_obs": self._flags(True),
                 "final_info": self._info(info), "_final_info": self._flags(True)}
        q.next_round(self.np_random)
        return self._obs(), self._reward(reward), self._flags(True), self._flags(False), final

    def action_masks(self) -> np.ndarray | torch.Tensor:
        """Which children each env may take now: ``[num_envs, b]`` bool (for MaskablePPO)."""
        return self._out(self.queries.mask.clone())

    def pop_finished(self):
        """Finished tree batches since the last call (see ``record_batches``)."""
        return self.queries.pop_finished()

    def close_extras(self, **kwargs: Any) -> None:
        self.queries.ctx = None

    # --------------------------------------------------------------------------------- helpers

    def _out(self, x: torch.Tensor):
        return x if self.array_type == "torch" else x.cpu().numpy()

    def _reward(self, reward: torch.Tensor | None):
        """Rewards ``[E]``: float64 in numpy (as Gymnasium's vector envs), float32 in torch; zeros before the leaf."""
        if reward is None:
            reward = torch.zeros(self.num_envs, device=self.device)
        return reward if self.array_type == "torch" else reward.cpu().numpy().astype(np.float64)

    def _flags(self, value: bool):
        return self._out(torch.full((self.num_envs,), value, dtype=torch.bool, device=self.device))

    def _obs(self) -> dict[str, Any]:
        q = self.queries
        child, mask = q.terminal_children() if q.done else (q.child_emb, q.mask)
        depth = torch.full((self.num_envs,), q.k if q.done else q.s, dtype=torch.long, device=q.device)
        # Fresh tensors on every call: users keep what they were given. The children's embeddings are gathered
        # anew at every step and never read back by the env, so they are handed out without another copy.
        return {"query_emb": self._out(q.query_emb.clone()), "child_emb": self._out(child.contiguous()),
                "action_mask": self._out(mask.to(torch.int8)), "depth": self._out(depth)}

    def _info(self, info: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Gymnasium's vector info: every key for every env, each with its ``_key`` mask."""
        out: dict[str, Any] = {}
        for key, value in info.items():
            out[key], out[f"_{key}"] = self._out(value), self._flags(True)
        return out

    def _split(self, obs: dict[str, Any]) -> np.ndarray:
        """Batched observations -> an object array of per-env observation dicts (Gymnasium's ``final_obs``).

        Built once per episode end, so that Gymnasium's vector wrappers, which iterate ``final_obs`` per env,
        work unchanged.
        """
        keys = list(obs)
        arr = np.empty(self.num_envs, dtype=object)
        arr[:] = [dict(zip(keys, row, strict=True)) for row in zip(*(list(obs[k]) for k in keys), strict=True)]
        return arr


def make_vector_env(num_envs: int = 1, **kwargs: Any) -> TreeRetrievalVectorEnv:
    """The ``vector_entry_point`` of TreeRetrieval-v0."""
    return TreeRetrievalVectorEnv(num_envs=num_envs, **kwargs)


__all__ = ["TreeRetrievalVectorEnv", "make_vector_env", "Batch"]
