"""TreeRetrieval-v0: one query descends one tree of Tree Cross Attention, one level per step.

:class:`TreeQueries` is the engine shared by :class:`TreeRetrievalEnv` (one query at a time, numpy)
and :class:`~tca_env.vector_env.TreeRetrievalVectorEnv` (many queries in lockstep, torch): it samples a
task batch, has the predictor build the trees once (``ReTreever.prepare``), serves the batch's B*M
queries in rounds of ``num_slots`` episodes, advances every slot with :func:`tca_env.search.step` (the
per-level step of the fused trainer) and scores each leaf with ``model.predict_path`` and
``model.head.reward``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from . import backend, pretrained, search
from .checkpoint import load_predictor, task_of
from .model import Context, ModelConfig, ReTreever
from .tasks import TASKS, Batch, Task, make_task
from .tree import TreeShape, tree_depth

INVALID_ACTIONS = ("redirect", "error")
#: the keys ``reset(options=...)`` understands
RESET_OPTIONS = frozenset({"batch"})


def as_action(action: Any) -> int:
    """One env's action as a Python int: ints, numpy integers and 0-d integer arrays / tensors are accepted;
    floats, bools and strings are refused (``int(1.7)`` would silently take child 1)."""
    if isinstance(action, (bool, np.bool_)):
        raise TypeError(f"an action is a child index (an integer); got the bool {action!r}")
    if isinstance(action, (int, np.integer)):
        return int(action)
    if isinstance(action, (np.ndarray, torch.Tensor)) and action.ndim == 0:
        dt = action.dtype
        integer = (np.issubdtype(dt, np.integer) if isinstance(action, np.ndarray)
                   else not (dt.is_floating_point or dt.is_complex or dt == torch.bool))
        if integer:
            return int(action.item())
    raise TypeError(f"an action is a child index (an integer); got {type(action).__name__} {action!r}")


# ------------------------------------------------------------------------------------ construction

def build_task_and_predictor(task: str | Task | None, task_options: dict[str, Any] | None,
                             predictor: ReTreever | str | Path | None, branch: int | None = None,
                             device: str | torch.device | None = None, seed: int | None = None,
                             model_options: dict[str, Any] | None = None) -> tuple[Task, ReTreever]:
    """An environment's task and predictor.

    ``predictor``: a model, ``"fresh"`` or None (a new model for ``task``), ``"pretrained:<name>"`` (a
    shipped predictor, :mod:`tca_env.pretrained`) or a checkpoint path. A shipped or saved predictor
    brings the task it was trained on: ``task`` / ``task_options`` may be left out, and if given they must
    agree with it (a contradiction is an error naming both values): a predictor trained on another task
    size would hand out rewards at chance without a word. The exception is a task's ``size_options``
    (the recall task's context_len, min_context_len, num_queries, min_key_scale; GP's num_context, num_target): a
    predictor may be run at other sizes, and sizes given replace all the trained ones.
    """
    if isinstance(predictor, str) and predictor == "fresh":
        predictor = None
    trained: tuple[str, dict[str, Any]] | None = None
    if isinstance(predictor, (str, Path)):
        if model_options:
            raise ValueError("model_options configure a fresh predictor; a trained one was given")
        if pretrained.is_pretrained(predictor):
            predictor, meta = pretrained.load(str(predictor), device or "cpu")
            trained = (meta["task"], meta["task_options"])
        else:
            predictor, ckpt = load_predictor(predictor, device or "cpu")
            trained = task_of(ckpt)
    if isinstance(task, Task):
        return task, make_predictor(task, predictor, branch, device, seed, model_options)
    options = dict(task_options or {})
    if trained is not None:
        name, opts = trained
        if task is not None and task != name:
            raise ValueError(f"task {task!r} given, but the predictor was trained on task {name!r}; pass "
                             "predictor='fresh' to train a new one")
        sizes = set(getattr(TASKS.get(name), "size_options", ()))
        clash = _option_clash(name, opts, {k: v for k, v in options.items() if k not in sizes})
        if clash:
            raise ValueError(f"task_options contradict the task the predictor was trained on (given, trained): "
                             f"{clash}; pass predictor='fresh' to train a new one")
        if sizes & set(options):  # sizes given: they replace the trained ones (no trained min_context_len left)
            opts = {k: v for k, v in opts.items() if k not in sizes}
        task, options = name, {**opts, **options}
    built = make_task(task or "copy", **options)
    return built, make_predictor(built, predictor, branch, device, seed, model_options)


def _option_clash(name: str, trained: dict[str, Any], given: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Options of ``given`` that change the task built from ``trained`` (defaults included): {key: (given, trained)}."""
    if not given:
        return {}
    a, b = vars(make_task(name, **trained)), vars(make_task(name, **{**trained, **given}))
    changed = {k for k in a if k in b and _plain(a[k]) and a[k] != b[k]}
    out = {}
    for k in given:
        if k in changed or (k in trained and trained[k] != given[k]):
            out[k] = (given[k], trained.get(k, a.get(k)))
    if changed and not out:  # a given option changed a derived attribute
        out = {k: (given[k], trained.get(k)) for k in given}
    return out


def _plain(x: Any) -> bool:
    return isinstance(x, (int, float, str, bool, tuple)) or x is None


def make_predictor(task: Task, predictor: ReTreever | str | Path | None = None, branch: int | None = None,
                   device: str | torch.device | None = None, seed: int | None = None,
                   model_options: dict[str, Any] | None = None) -> ReTreever:
    """The environment's predictor for ``task``: a given model, a checkpoint path, or a fresh model.

    A given model stays where it is (it is usually shared with a trainer), so ``device`` must agree with
    it. A fresh model is initialised from ``seed`` (0 when None) without touching the global RNG.
    """
    if isinstance(predictor, ReTreever):
        if model_options:
            raise ValueError("model_options configure a fresh predictor; a predictor object was given")
        dev = next(predictor.parameters()).device
        if device is not None and torch.device(device) != dev:
            raise ValueError(f"the predictor is on {dev} but device={device!r}; move the predictor or drop device")
        model = predictor
    elif isinstance(predictor, (str, Path)):
        if model_options:
            raise ValueError("model_options configure a fresh predictor; a checkpoint path was given")
        model, _ = load_predictor(predictor, device or "cpu")
    elif predictor is None:
        opts = dict(model_options or {})
        if branch is not None:
            opts["branch"] = branch
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            model = ReTreever(ModelConfig.for_task(task, **opts))
        model = model.to(device or "cpu")
    else:
        raise TypeError(f"predictor must be a ReTreever, a checkpoint path or None; got {type(predictor).__name__}")
    c = model.cfg
    if c.decoder != "tca":
        raise ValueError(f"the environment searches a tree: the predictor's decoder must be 'tca', not {c.decoder!r}")
    if branch is not None and branch != c.branch:
        raise ValueError(f"branch={branch} but the predictor was built with branch factor {c.branch}")
    if (c.x_dim, c.y_dim, c.out_dim, c.head) != (task.x_dim, task.y_dim, task.out_dim, task.head):
        raise ValueError(f"predictor (x_dim={c.x_dim}, y_dim={c.y_dim}, out_dim={c.out_dim}, head={c.head!r}) does "
                         f"not fit task {task.name!r} (x_dim={task.x_dim}, y_dim={task.y_dim}, "
                         f"out_dim={task.out_dim}, head={task.head!r})")
    return model


@contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode under ``no_grad``, restoring the caller's mode (the predictor may be mid-training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _take(obj: Any, rows: slice) -> Any:
    """Rows ``rows`` of every batch-first tensor in ``obj`` (a tensor, list/tuple or dataclass of them)."""
    if isinstance(obj, torch.Tensor):
        return obj[rows]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(x, rows) for x in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _take(getattr(obj, f.name), rows) for f in fields(obj) if f.init})
    return obj  # shapes, ints, None


def sub_context(ctx: Context, rows: slice, cols: slice) -> Context:
    """The context sets ``rows`` and, within them, the queries ``cols`` (views, no copies)."""
    b = ctx.batch.index(rows)
    pt = None if b.pt is None else b.pt[..., cols]
    batch = replace(b, xt=b.xt[:, cols], yt=b.yt[:, cols], pt=pt)
    return replace(ctx, batch=batch, enc=_take(ctx.enc, rows), query_emb=ctx.query_emb[rows, cols],
                   q=ctx.q[rows, cols], tree=_take(ctx.tree, rows), kv=_take(ctx.kv, rows),
                   enc_kv=_take(ctx.enc_kv, rows))


def observation_space(d_model: int, b: int, k_max: int) -> spaces.Dict:
    # Embeddings are unbounded by construction (linear layers and attention, no squashing).
    return spaces.Dict({
        "query_emb": spaces.Box(-np.inf, np.inf, (d_model,), np.float32),
        "child_emb": spaces.Box(-np.inf, np.inf, (b, d_model), np.float32),
        "action_mask": spaces.MultiBinary(b),
        "depth": spaces.Discrete(k_max + 1),
    })


# ------------------------------------------------------------------------------------------ engine

@dataclass
class FinishedBatch:
    """A tree batch whose B*M episodes are all done: what the co-trainer replays to update the predictor."""

    batch: Batch
    actions: torch.Tensor  # [B, M, k] the child taken at each level (after redirects)
    reward: torch.Tensor  # [B, M]
    metric: torch.Tensor  # [B, M]
    invalid: torch.Tensor  # [B, M] masked actions that were redirected


class TreeQueries:
    """A batch of trees and ``num_slots`` queries descending them in lockstep.

    The batch's Q = B*M queries (flat index ``b*M + m``) are served in Q / num_slots rounds of
    consecutive queries; all episodes of a round have the same length k, so they start and end together.
    A round's queries form a block of context sets ``rows`` and queries ``cols``; the block is exact when
    num_slots divides M or M divides num_slots, otherwise it spans whole rows and ``pos`` picks the slots.
    State is kept in block layout ``[rows, cols]`` (what :func:`search.step` takes) and returned per slot.
    """

    def __init__(self, task: Task, model: ReTreever, num_slots: int, batch_size: int | None = None,
                 reward: str | None = None, invalid_action: str = "redirect", record_batches: bool = False):
        if num_slots < 1:
            raise ValueError(f"num_envs must be >= 1; got {num_slots}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if invalid_action not in INVALID_ACTIONS:
            raise ValueError(f"unknown invalid_action {invalid_action!r}; choose one of {INVALID_ACTIONS}")
        self.task, self.model, self.num_slots = task, model, num_slots
        self.batch_size, self.invalid_action, self.record_batches = batch_size, invalid_action, record_batches
        self.reward_kind = reward or model.cfg.reward
        replace(model.cfg, reward=self.reward_kind).validate()  # the model's own rule of which reward fits its head
        self.b = model.cfg.branch
        self.k_max = tree_depth(task.max_context, self.b)
        if self.k_max < 1:
            raise ValueError(f"task {task.name!r} has at most {task.max_context} context tokens: a tree with branch "
                             f"factor {self.b} over them has depth 0 (no decision to take); it needs more than "
                             f"{self.b} tokens")
        # M per context set, from one probe sample; it sets how many context sets make whole rounds.
        probe = task.sample(1, torch.Generator().manual_seed(0))
        self.M = probe.M
        self.finished: list[FinishedBatch] = []
        # The served tree batch (load_batch) and the round of queries descending it (_start_round).
        self.ctx: Context | None = None
        self.batch: Batch | None = None
        self.shape: TreeShape | None = None
        self.k = self.B = self.Q = self.batch_M = self.rounds = self.round = self.s = 0
        self.complete = True  # every round of the batch so far ran to its leaf (it can be replayed whole)
        self.rows, self.cols, self.pos = slice(0, 0), slice(0, 0), None
        self.sub: Context | None = None
        self.path = self.invalid = self.query_emb = self.child_emb = self.mask = self.policy_probs = None
        self.scores: list[torch.Tensor] = []
        self.actions = self.rewards = self.metrics = self.invalids = None  # record_batches buffers
        self.done = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def ready(self) -> bool:
        return self.ctx is not None

    def context_sets(self, M: int) -> int:
        """Context sets per tree batch: the given batch size, or the fewest giving whole rounds."""
        return self.batch_size or self.num_slots // math.gcd(self.num_slots, M)

    # ------------------------------------------------------------------------------ batches, rounds

    def sample_batch(self, rng: np.random.Generator) -> None:
        """Sample a task batch from ``rng`` (through a torch generator seeded from it) and build its trees."""
        g = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        self.load_batch(self.task.sample(self.context_sets(self.M), g))

    def load_batch(self, batch: Batch) -> None:
        """Build the trees of ``batch`` with the predictor and start its first round."""
        if not isinstance(batch, Batch):
            raise TypeError(f"expected a tca_env.tasks.Batch; got {type(batch).__name__}")
        batch = batch.to(self.device)
        B, M, N = batch.B, batch.M, batch.N
        if (B * M) % self.num_slots:
            raise ValueError(f"a tree batch of {B} context sets x {M} queries cannot be served in whole rounds of "
                             f"{self.num_slots} envs; use num_envs dividing {B * M}, or a batch_size making "
                             "batch_size * M a multiple of num_envs (tasks with a varying M need a fixed one, e.g. "
                             "the task option num_target)")
        k = tree_depth(N, self.b)
        if k > self.k_max:
            raise ValueError(f"a batch with N = {N} context tokens makes trees of depth {k}, deeper than the "
                             f"observation space allows ({self.k_max}, from the task's max_context)")
        if k < 1:
            raise ValueError(f"a tree over N = {N} context tokens with branch factor {self.b} has depth 0: there is "
                             f"no decision to take; tasks need more than {self.b} context tokens")
        with evaluating(self.model):
            self.ctx = self.model.prepare(batch)
        self.batch, self.shape, self.k = batch, TreeShape(N, self.b), k
        self.B, self.Q = B, B * M
        self.batch_M = M
        self.rounds = self.Q // self.num_slots
        self.round = 0
        self.complete = True  # every round so far ran to its leaf
        if self.record_batches:
            self.actions = torch.zeros(self.Q, k, dtype=torch.long, device=self.device)
            self.rewards = torch.zeros(self.Q, device=self.device)
            self.metrics = torch.zeros(self.Q, device=self.device)
            self.invalids = torch.zeros(self.Q, dtype=torch.long, device=self.device)
        self._start_round()

    def start(self, options: dict[str, Any], seed: int | None, rng: np.random.Generator) -> None:
        """Begin the next episodes on reset: a given batch, a new batch (seeded or first), or the next round."""
        unknown = sorted(set(options) - RESET_OPTIONS)
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; the options are {sorted(RESET_OPTIONS)}")
        if "batch" in options:
            self.load_batch(options["batch"])
        elif seed is not None or not self.ready:
            self.sample_batch(rng)
        else:
            self.next_round(rng)

    def next_round(self, rng: np.random.Generator) -> None:
        """Start the next round of queries, sampling a new batch after the last one."""
        if not self.done:
            self.complete = False  # an abandoned episode: this batch cannot be replayed whole
        if self.round + 1 < self.rounds:
            self.round += 1
            self._start_round()
        else:
            self.sample_batch(rng)

    def _start_round(self) -> None:
        E, M = self.num_slots, self.batch_M
        start, stop = self.round * E, (self.round + 1) * E
        lo, hi = start // M, (stop - 1) // M
        if lo == hi:
            self.rows, self.cols, self.pos = slice(lo, lo + 1), slice(start - lo * M, stop - lo * M), None
        else:
            self.rows, self.cols = slice(lo, hi + 1), slice(0, M)
            exact = start == lo * M and stop == (hi + 1) * M
            self.pos = None if exact else torch.arange(start - lo * M, stop - lo * M, device=self.device)
        self.sub = sub_context(self.ctx, self.rows, self.cols)
        nr, nc = self.sub.q.shape[:2]
        self.s = 0
        self.path = torch.zeros(nr, nc, self.k + 1, dtype=torch.long, device=self.device)
        self.scores: list[torch.Tensor] = []  # per level, the children's per-head scores (the read-out reuses them)
        self.invalid = torch.zeros(E, dtype=torch.long, device=self.device)
        self.done = False
        self.query_emb = self._slots(self.sub.query_emb)  # [E, D]
        self._observe_children()

    def correct_actions(self) -> torch.Tensor | None:
        """The child on the way to the leaf holding each slot's target token, ``[E]`` (None when the task
        does not know its queries' targets: :meth:`Task.target_tokens`)."""
        target = self.task.target_tokens(self.batch)
        if target is None:
            return None
        tree = self.ctx.tree
        B = target.shape[0]
        rank = torch.empty_like(tree.perm)  # rank[b, token] = position of token in the ordering
        rank.scatter_(1, tree.perm, torch.arange(tree.perm.shape[1], device=tree.perm.device).expand(B, -1))
        slot = self.shape.slot_index(tree.perm.device)[rank.gather(1, target)]  # [B, M]
        leaf = slot // self.shape.P
        child = (leaf // self.b ** (self.k - 1 - self.s)) % self.b  # [B, M] the child at this step
        return self._slots(child[self.rows, self.cols])

    def _slots(self, x: torch.Tensor) -> torch.Tensor:
        """Block layout ``[rows, cols, ...]`` -> slot layout ``[E, ...]``."""
        flat = x.flatten(0, 1)
        return flat if self.pos is None else flat.index_select(0, self.pos)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        """Slot layout ``[E]`` -> block layout ``[rows, cols]`` (slots outside the round take child 0)."""
        nr, nc = self.path.shape[:2]
        if self.pos is None:
            return x.view(nr, nc)
        full = torch.zeros(nr * nc, dtype=x.dtype, device=x.device)
        return full.index_copy_(0, self.pos, x).view(nr, nc)

    def _observe_children(self) -> None:
        """Embeddings ``[E, b, D]`` and mask ``[E, b]`` of the children of every slot's current node."""
        tree, s = self.sub.tree, self.s
        node = self.path[..., s]  # [rows, cols]; its children are b contiguous rows of the next level
        self.child_emb = self._slots(search.gather_block(tree.nodes[s + 1], node, self.b))  # [E, b, D]
        self.mask = self._slots(search.gather_block(tree.node_mask[s + 1], node, self.b))  # [E, b]

    # -------------------------------------------------------------------------------------- stepping

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Take child ``action [E]`` in every slot; returns the leaf rewards ``[E]`` (None before the leaf) and info."""
        if not self.ready:
            raise ResetNeeded("call reset() before step()")
        if self.done:
            raise ResetNeeded("the episodes of this round are over: call reset() before stepping again")
        if action.dtype.is_floating_point or action.dtype.is_complex or action.dtype == torch.bool:
            raise TypeError(f"actions must be integers (child indices); got dtype {action.dtype}")
        action = action.to(self.device, torch.long).reshape(-1)
        if action.shape[0] != self.num_slots:
            raise ValueError(f"expected {self.num_slots} actions; got {action.shape[0]}")
        if bool(((action < 0) | (action >= self.b)).any()):
            raise ValueError(f"actions must lie in [0, {self.b}); got {action.tolist()[:16]}")
        ok = self.mask.gather(1, action.unsqueeze(1)).squeeze(1)  # [E]
        redirected = ~ok
        if bool(redirected.any()):
            if self.invalid_action == "error":
                bad = redirected.nonzero().flatten().tolist()[:16]
                raise ValueError(f"masked action (a child that holds no token) in envs {bad}; pass "
                                 "invalid_action='redirect' or honour action_masks()")
            # The leftmost real child: a real node always has one.
            action = torch.where(ok, action, self.mask.to(torch.uint8).argmax(1))
            self.invalid += redirected
        with evaluating(self.model):
            r = search.step(self.sub.kv, self.sub.q, self.s, self.path[..., self.s], action=self._block(action))
        self.policy_probs = self._slots(r.log_probs.exp())  # [E, b] the predictor's own attention policy
        self.scores.append(r.scores)
        self.s += 1
        self.path[..., self.s] = r.node
        info = {"invalid_action": redirected}
        if self.s < self.k:
            self._observe_children()
            return None, info
        self.done = True
        with evaluating(self.model), backend.matmul_scope(self.num_slots):
            # The read-out reuses the siblings' scores of the k steps (the same numbers it would recompute).
            zero = torch.zeros(self.path.shape[:2], device=self.device)
            descent = search.Descent(self.path, zero, zero, self.scores, self.b)
            out = self.model.predict_path(self.sub, self.path, descent)  # [rows, cols, out]
            y = self.sub.batch.yt
            reward = self._slots(self.model.head.reward(out, y, self.reward_kind))  # [E]
            metric = self._slots(self.model.head.metric(out, y))
        path = self._slots(self.path)  # [E, k+1]
        info.update(metric=metric, invalid_actions=self.invalid.clone(), path=path)
        if self.record_batches:
            self._record(path, reward, metric)
        return reward, info

    def _record(self, path: torch.Tensor, reward: torch.Tensor, metric: torch.Tensor) -> None:
        sl = slice(self.round * self.num_slots, (self.round + 1) * self.num_slots)
        self.actions[sl] = path[:, 1:] - self.b * path[:, :-1]
        self.rewards[sl], self.metrics[sl], self.invalids[sl] = reward, metric, self.invalid
        if self.round + 1 == self.rounds and self.complete:
            B, M = self.B, self.batch_M
            self.finished.append(FinishedBatch(self.batch, self.actions.view(B, M, self.k), self.rewards.view(B, M),
                                               self.metrics.view(B, M), self.invalids.view(B, M)))

    def pop_finished(self) -> list[FinishedBatch]:
        """Drain the batches whose episodes all finished since the last call (``record_batches=True``)."""
        out, self.finished = self.finished, []
        return out

    def terminal_children(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A leaf has no children: zero embeddings ``[E, b, D]`` and an all-false mask ``[E, b]``."""
        return torch.zeros_like(self.child_emb), torch.zeros_like(self.mask)


# -------------------------------------------------------------------------------------- the env

class TreeRetrievalEnv(gym.Env):
    """
    ## Description

    Tree Cross Attention (Feng et al., ICLR 2024) answers a query by descending a tree built over the
    context tokens, one level at a time, and cross-attending only to what the descent retrieved. This
    environment is that descent: an episode is one query walking from the root of its context's tree to
    a leaf bucket. Every sibling it passes over and the P tokens of the leaf it reaches form the retrieved
    set S (``(b-1)*k + P`` tokens), from which the ReTreever predictor makes its prediction.

    A reset samples a task batch of B context sets with M queries each, and the predictor builds the B
    trees once (``ReTreever.prepare``: node embeddings, keys and values). The batch's B*M queries are
    then served as consecutive episodes (query ``m`` of context set ``b`` in order ``b*M + m``) before the
    next batch is sampled. Steps run :func:`tca_env.search.step`, the per-level step of the fused trainer.

    ```python
    import gymnasium as gym
    import tca_env  # registers the ids

    env = gym.make("TreeRetrieval-v0", task="copy", task_options={"seq_len": 64})
    obs, info = env.reset(seed=0)
    ```

    ## Action Space

    ``Discrete(b)``: which child of the current node to descend into (b is the branch factor, 2 by
    default). A child holding no token (all padding) is masked in ``obs["action_mask"]`` and by
    :meth:`action_masks`. A masked action is redirected to the leftmost real child and counted in
    ``info["invalid_action"]`` (``invalid_action="redirect"``, the default) or raises ``ValueError``
    (``invalid_action="error"``). The trees of the built-in layout spread tokens evenly, so a real node's
    children are all real and masks only bite on custom trees. Actions outside ``[0, b)`` always raise.

    ## Observation Space

    A ``Dict`` (D is the predictor's width ``d_model``, k_max the depth of a tree over the task's
    largest context):

    | Key           | Space                    | Meaning                                                |
    |---------------|--------------------------|--------------------------------------------------------|
    | `query_emb`   | `Box(-inf, inf, (D,))`   | the query's embedding ``ctx.query_emb`` (fixed per episode) |
    | `child_emb`   | `Box(-inf, inf, (b, D))` | the current node's children, rows of ``tree.nodes[s+1]`` |
    | `action_mask` | `MultiBinary(b)`         | 1 for children holding at least one real token         |
    | `depth`       | `Discrete(k_max + 1)`    | the current level s (0 at the root, k at the leaf)     |

    At the last step the children are the leaf buckets (``tree.nodes[k]``, aggregates of their P tokens).
    The observation after the last step (the leaf) has zero ``child_emb`` and an all-zero mask. All
    embeddings come from the predictor in eval mode under ``no_grad``: they are detached data.

    ## Rewards

    0 at every step but the last; then the per-query metric of the prediction made from S with
    ``model.head.reward``: ``"acc"`` (1 if the predicted class is right), ``"nce"`` (minus the cross
    entropy plus log C, so a uniform guess scores 0), ``"ll"`` (log-likelihood, Normal head) or ``"mse"``
    (minus the squared error). The default is the predictor's (the task's) reward. With ``gamma = 1``
    the return is exactly that metric.

    ## Starting State

    The root of the tree of the query's context set (``depth = 0``).

    ## Episode End

    The episode terminates when the query reaches a leaf bucket, after exactly k steps (the tree's depth,
    ``floor(log_b(N - 1))``). It never truncates. Trees of depth 0 (N <= b context tokens) offer no
    decision and are refused with a ``ValueError``.

    ## Arguments

    ```python
    gym.make("TreeRetrieval-v0", task=None, task_options=None, predictor="pretrained:copy-easy", branch=None,
             reward=None, device=None, seed=None, invalid_action="redirect", batch_size=1, model_options=None,
             render_mode=None)
    ```

    * ``task``: a task name (``tca_env.tasks.TASKS``, or ``"package.module:Name"``) or a
      :class:`~tca_env.tasks.Task`; ``task_options`` are passed to its constructor (e.g. ``{"seq_len": 128}``
      for copy). With a trained predictor both may be left out: it brings the task it was trained on, and
      given ones must agree with it (a contradiction is a ``ValueError`` naming both values).
    * ``predictor``: ``"pretrained:<name>"`` (a shipped trained predictor, :mod:`tca_env.pretrained`; the
      registered ids default to one), a path to a checkpoint written by ``tca train``, a
      :class:`~tca_env.model.ReTreever` (used as is, shared with whoever trains it), or ``"fresh"`` / None
      for a new model for ``task`` (default copy) initialised from ``seed`` and configured by
      ``model_options`` (``ModelConfig`` fields, e.g. ``{"d_model": 32}``): the start of co-training. An
      untrained predictor scores every leaf at chance, so the path does not matter yet.
    * ``branch``: branch factor b of a fresh predictor (must match a given one).
    * ``reward``: ``"acc" | "nce" | "ll" | "mse"``; default: the predictor's.
    * ``device``: torch device of a fresh or loaded predictor (default: cpu, or the given model's device).
    * ``seed``: seed of the first ``reset`` when that passes none (and of a fresh predictor's weights).
    * ``invalid_action``: ``"redirect"`` or ``"error"`` (see Action Space).
    * ``batch_size``: context sets per tree batch (each holds M queries, so B*M episodes per batch).
    * ``render_mode``: ``"ansi"`` returns the path taken with the predictor's attention probabilities;
      ``"rgb_array"`` an image of it (one row per tree level; what SB3's ``make_vec_env`` asks for).

    ``reset(seed=...)`` samples a new batch; ``reset()`` moves on to the next query (a new batch after
    the last). ``reset(options={"batch": batch})`` serves a given :class:`~tca_env.tasks.Batch`.
    ``info`` holds ``invalid_action`` at every step and, at the leaf, ``metric`` (the task metric of the
    prediction), ``invalid_actions`` (redirects in the episode) and ``path`` (node index per level).

    ## Vectorized environment

    ``gym.make_vec("TreeRetrieval-v0", num_envs=1024, vectorization_mode="vector_entry_point")`` returns
    :class:`~tca_env.vector_env.TreeRetrievalVectorEnv`, which steps all queries in lockstep with tensor
    operations on one device (same-step autoreset by default); prefer it to ``"sync"`` or ``"async"``.

    ## Version History

    * v0: Initial version. Since package 0.2, ``TreeRetrieval-v0`` starts from the shipped copy-easy predictor
      (``predictor="fresh"`` gives the former default, a new model); the benchmark ids are new in 0.2.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, task: str | Task | None = None, task_options: dict[str, Any] | None = None,
                 predictor: ReTreever | str | Path | None = None, branch: int | None = None,
                 reward: str | None = None, device: str | torch.device | None = None, seed: int | None = None,
                 invalid_action: str = "redirect", batch_size: int = 1, model_options: dict[str, Any] | None = None,
                 render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; choose one of {self.metadata['render_modes']}")
        self.task, self.predictor = build_task_and_predictor(task, task_options, predictor, branch, device, seed,
                                                             model_options)
        self.queries = TreeQueries(self.task, self.predictor, 1, batch_size, reward, invalid_action)
        q = self.queries
        self.observation_space = observation_space(self.predictor.cfg.d_model, q.b, q.k_max)
        self.action_space = spaces.Discrete(q.b)
        self.render_mode = render_mode
        self._first_seed = seed
        self._trace: list[tuple[int, np.ndarray, bool]] = []
        self._last: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self._first_seed is not None and self._np_random is None:
            seed = self._first_seed
        super().reset(seed=seed)
        options = options or {}
        self.queries.start(options, seed, self.np_random)
        self._trace, self._last = [], {}
        return self._obs(), {}

    def step(self, action):
        a = as_action(action)
        q = self.queries
        reward, info = q.step(torch.tensor([a]))
        self._trace.append((a, q.policy_probs[0].cpu().numpy(), bool(info["invalid_action"][0])))
        out = {"invalid_action": bool(info["invalid_action"][0])}
        if reward is None:
            return self._obs(), 0.0, False, False, out
        out.update(metric=float(info["metric"][0]), invalid_actions=int(info["invalid_actions"][0]),
                   path=info["path"][0].cpu().numpy())
        self._last = {"reward": float(reward[0]), **out}
        return self._obs(), float(reward[0]), True, False, out

    def _frame(self) -> np.ndarray:
        """The path so far as an image ``[row * (k + 1), width, 3]`` uint8: row l spans the b^l nodes of level l
        over the width; the chosen node is blue (red when a masked action was redirected), its siblings orange
        in proportion to the predictor's attention on them; the root row is pale blue."""
        q = self.queries
        k = q.k if q.ready else 0
        W, row = self.frame_width, self.frame_row
        img = np.full(((k + 1) * row, W, 3), 245, np.uint8)
        img[: row - 2] = (200, 215, 235)
        node = 0
        for level, (a, probs, redirected) in enumerate(self._trace, start=1):
            parent, node = node, node * q.b + a
            edges = np.linspace(0, W, q.b**level + 1)
            y = level * row
            for c in range(q.b):
                x0 = int(edges[parent * q.b + c])
                x1 = max(int(edges[parent * q.b + c + 1]), x0 + 1)
                if c == a:
                    color = (200, 60, 40) if redirected else (31, 78, 160)
                else:
                    w = float(probs[c])
                    color = tuple(int(245 + (t - 245) * w) for t in (240, 140, 30))
                img[y: y + row - 2, x0:x1] = color
        return img

    def _obs(self) -> dict[str, Any]:
        q = self.queries
        child, mask = q.terminal_children() if q.done else (q.child_emb, q.mask)
        return {"query_emb": q.query_emb[0].cpu().numpy().copy(), "child_emb": child[0].cpu().numpy().copy(),
                "action_mask": mask[0].cpu().numpy().astype(np.int8), "depth": np.int64(q.k if q.done else q.s)}

    def action_masks(self) -> np.ndarray:
        """Which children may be taken now: ``[b]`` bool (for sb3-contrib's MaskablePPO)."""
        return self.queries.mask[0].cpu().numpy().copy()

    #: ``rgb_array`` frames: width in pixels and height of one tree level
    frame_width, frame_row = 512, 12

    def render(self) -> str | np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self._frame()
        if self.render_mode != "ansi":
            return None
        q = self.queries
        if not q.ready:
            return "TreeRetrieval: call reset() first\n"
        flat = q.round  # one slot: the round is the flat query index
        lines = [f"query {flat % q.batch_M} of context set {flat // q.batch_M} (batch of {q.B} x {q.batch_M}), "
                 f"N = {q.shape.n}, b = {q.b}, depth {q.k if q.done else q.s}/{q.k}, |S| = {q.shape.retrieved_size}"]
        node = 0
        for level, (a, probs, redirected) in enumerate(self._trace):
            node = node * q.b + a
            p = " ".join(f"{x:.2f}" for x in probs)
            note = " [redirected]" if redirected else ""
            lines.append(f"  level {level} -> {level + 1}: child {a} (node {node}){note}  predictor attention [{p}]")
        if self._last:
            lines.append(f"  leaf bucket {node}: reward {self._last['reward']:.4f}, metric {self._last['metric']:.4f}, "
                         f"invalid actions {self._last['invalid_actions']}")
        return "\n".join(lines) + "\n"
