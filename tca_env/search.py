"""Batched root-to-leaf search of Tree Cross Attention, for all B*M queries at once.

The policy at a node is the attention of the query over the node's children, averaged over heads:
pi(c | q) = mean_h softmax_c(<q_h, k_{c,h}>) (the paper's policy), computed with the keys of the
same attention module that does the read-out. Keys and values are projected once per tree
(:class:`TreeKV`); a query only gathers the rows it visits.

A path is the node index at every level, ``path [B, M, k+1]`` (``path[..., 0] = 0`` is the root and
``path[..., k]`` the leaf bucket); the action at step s is ``path[s+1] - b * path[s]``. The retrieved
set S holds every unselected sibling on the path and the P token slots of the chosen bucket.

:func:`step` is one level (it drives the Gymnasium environment), :func:`descend` is all k levels
(the fused trainer and evaluation), :func:`readout` attends over S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .layers import masked_fill_value
from .tree import Tree, TreeShape

SEARCH_MODES = ("greedy", "sample")


@dataclass
class TreeKV:
    """Keys and values of every node below the root and of every token slot.

    Attributes:
        shape: the tree's sizes.
        keys / values: element ``s`` (0 <= s < k) is ``[B, b^(s+1), H, dh]``: the candidates of step s.
        masks: element ``s`` is ``[B, b^(s+1)]``, which of those nodes are real (None: all of them).
        tok_keys / tok_values: ``[B, P*b^k, H, dh]`` token slots; tok_mask ``[B, P*b^k]`` (None: no padding).
    """

    shape: TreeShape
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    masks: list[torch.Tensor | None]
    tok_keys: torch.Tensor
    tok_values: torch.Tensor
    tok_mask: torch.Tensor | None

    @classmethod
    def from_tree(cls, tree: Tree, project, tok_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> TreeKV:
        """Project with ``project(x [.., D]) -> (k, v) [.., H, dh]``; ``tok_kv`` reuses token projections."""
        shape = tree.shape
        kv = [project(tree.nodes[level]) for level in range(1, shape.k + 1)]
        tk, tv = project(tree.tokens) if tok_kv is None else tok_kv
        # Padding depends only on N: levels without any (all of them when N = P * b^k) keep no mask.
        masks = [tree.node_mask[lvl] if shape.padded(lvl) else None for lvl in range(1, shape.k + 1)]
        tok_mask = None if shape.n == shape.num_slots else tree.token_mask
        return cls(shape, [k for k, _ in kv], [v for _, v in kv], masks, tk, tv, tok_mask)


def _gather_rows(table: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``table [B, R, ...]``, ``idx [B, M, c]`` row indices -> ``[B, M, c, ...]`` (one flat index_select).

    ``out`` is an optional flat workspace (no autograd) reused across levels: a fresh multi-MiB buffer
    per gather costs more in page faults on a CPU than the gather itself.
    """
    B, R = table.shape[:2]
    flat = (idx + (torch.arange(B, device=idx.device) * R).view(B, 1, 1)).reshape(-1)
    src = table.reshape(B * R, -1)  # 2-D index_select is the fast path
    if out is None:
        rows = src.index_select(0, flat)
    else:
        rows = torch.index_select(src, 0, flat, out=out[: flat.numel() * src.shape[1]].view(-1, src.shape[1]))
    return rows.view(*idx.shape, *table.shape[2:])


def workspace(q: torch.Tensor, rows_per_query: int) -> torch.Tensor | None:
    """A flat gather buffer for ``rows_per_query`` rows of width D per query, or None under autograd."""
    if torch.is_grad_enabled():
        return None
    return q.new_empty(q.shape[0] * q.shape[1] * rows_per_query * q.shape[2] * q.shape[3])


def gather_block(table: torch.Tensor, parent: torch.Tensor, c: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``parent*c .. parent*c + c-1`` of ``table [B, R, ...]`` for ``parent [B, M]``: ``[B, M, c, ...]``.

    Children of a node (and slots of a bucket) are contiguous rows, so one index per query fetches
    all of them: a single index_select of ``c``-row blocks.
    """
    B, R = table.shape[:2]
    rows = _gather_rows(table.reshape(B, R // c, -1), parent.unsqueeze(-1), out)
    return rows.view(*parent.shape, c, *table.shape[2:])


def child_index(shape: TreeShape, s: int, node: torch.Tensor) -> torch.Tensor:
    """Indices at level s+1 of the children of ``node [B, M]`` (level s): ``[B, M, b]``."""
    return node.unsqueeze(-1) * shape.b + torch.arange(shape.b, device=node.device)


def bucket_index(shape: TreeShape, leaf: torch.Tensor) -> torch.Tensor:
    """Token slots of leaf bucket ``leaf [B, M]``: ``[B, M, P]``."""
    return leaf.unsqueeze(-1) * shape.P + torch.arange(shape.P, device=leaf.device)


def child_scores(kv: TreeKV, q: torch.Tensor, s: int, node: torch.Tensor,
                 ws: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head scores of queries ``q [B, M, H, dh]`` (pre-scaled) over the children of ``node [B, M]``.

    Returns scores ``[B, M, b, H]`` and the children's mask ``[B, M, b]`` (None: no padded child).
    """
    b = kv.shape.b
    return _scores(q, gather_block(kv.keys[s], node, b, ws)), _block_mask(kv.masks[s], node, b)


def _block_mask(mask: torch.Tensor | None, parent: torch.Tensor, c: int) -> torch.Tensor | None:
    """Mask of the c children of ``parent``; ``None`` for a level without padding (the usual case)."""
    return None if mask is None else gather_block(mask, parent, c)


def _scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``q [B, M, H, dh]`` (pre-scaled), freshly gathered ``keys [B, M, c, H, dh]`` -> scores ``[B, M, c, H]``.

    Broadcast-multiply-sum: for a handful of keys per query this beats a batched matmul of tiny
    matrices by far on a CPU. Keys stay before heads: softmax over a short last dim is several times
    slower than over dim 2. Without autograd the gathered copy is multiplied in place.
    """
    if torch.is_grad_enabled():
        return (keys * q.unsqueeze(2)).sum(-1)
    return keys.mul_(q.unsqueeze(2)).sum(-1)


def head_probs(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each head's softmax over the children: ``scores [B, M, b, H]``, mask ``[B, M, b]`` -> ``[B, M, b, H]``.

    Masked children get probability exactly 0.
    """
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-1), masked_fill_value(scores.dtype))
    probs = scores.softmax(dim=2)
    return probs if mask is None else probs.masked_fill(~mask.unsqueeze(-1), 0.0)


def policy_log_probs(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log pi(c) = log mean_h p_h(c): per-head probabilities ``[B, M, b, H]`` -> ``[B, M, b]``.

    Masked children (``mask [B, M, b]`` False) get log-prob ``-inf``.
    """
    # A real child's probability can underflow to 0 (a large score gap); the floor keeps its log-prob finite.
    logp = probs.mean(-1).clamp_min(torch.finfo(probs.dtype).tiny).log()
    return logp if mask is None else logp.masked_fill(~mask, float("-inf"))


def head_entropy(probs: torch.Tensor) -> torch.Tensor:
    """The entropy bonus of one level: each head's entropy ``-sum_c p log(p + 1e-9)`` over the children,
    averaged over heads (the reference's definition): ``[B, M, b, H]`` -> ``[B, M]``."""
    return -(probs * (probs + 1e-9).log()).sum(2).mean(-1)


def observed_log_probs(readout: Any, query_emb: torch.Tensor, child_emb: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
    """The search policy from an environment observation: ``query_emb [n, D]``, ``child_emb [n, b, D]``,
    ``mask [n, b]`` -> log pi ``[n, b]`` (masked children: -inf), with a read-out's weights. The same
    softmax-then-average as :func:`step`, so both give the same numbers."""
    q = readout.queries(query_emb)  # [n, H, dh] pre-scaled
    keys, _ = readout.keys_values(child_emb)  # [n, b, H, dh]
    scores = (q.unsqueeze(1) * keys).sum(-1).unsqueeze(0)  # [1, n, b, H]
    m = None if mask is None else mask.bool().unsqueeze(0)
    return policy_log_probs(head_probs(scores, m), m).squeeze(0)


BASELINES = ("none", "batch_mean", "ema")


def advantage(reward: torch.Tensor, baseline: str = "none", ema: torch.Tensor | None = None, decay: float = 0.99,
              update: bool = True) -> torch.Tensor:
    """REINFORCE's reward minus its baseline: none (the paper's), the batch mean, or a moving average of the mean
    reward held in the 0-d tensor ``ema``, which moves (``ema <- decay * ema + (1 - decay) * mean``) after it is
    used when ``update``."""
    if baseline == "batch_mean":
        return reward - reward.mean()
    if baseline == "ema":
        if ema is None:
            raise ValueError("the 'ema' baseline needs its moving-average tensor")
        adv = reward - ema
        if update:
            ema.mul_(decay).add_((1 - decay) * reward.detach().mean())
        return adv
    if baseline != "none":
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    return reward


def reinforce_loss(log_prob: torch.Tensor, entropy: torch.Tensor, adv: torch.Tensor,
                   entropy_coef: float) -> torch.Tensor:
    """The search policy's loss, the one definition the fused step and the REINFORCE agent share:
    ``-mean(log pi(path) * advantage) - entropy_coef * mean(H)`` (the advantage carries no gradient)."""
    return -(log_prob * adv.detach()).mean() - entropy_coef * entropy.mean()


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each distribution over the last dim (zero-probability entries contribute 0): the entropy
    of a policy known only through its log-probabilities (an external agent's)."""
    p = log_probs.exp()
    return -torch.special.xlogy(p, p).sum(-1)


def choose(log_probs: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy (argmax) or sampled (Gumbel-max, exact for the categorical) child: ``[B, M]``."""
    if mode == "greedy":
        return log_probs.argmax(-1)
    if mode != "sample":
        raise ValueError(f"unknown search mode {mode!r}; choose one of {SEARCH_MODES}")
    return (log_probs.detach() + gumbel_noise(log_probs.shape, log_probs, generator)).argmax(-1)


def gumbel_noise(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel samples of ``shape`` (drawn on the generator's device, returned on ``like``'s)."""
    dev = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)
    return -torch.log(-torch.log(u.clamp(torch.finfo(u.dtype).tiny, 1.0)))


@dataclass
class StepResult:
    """One level of the search: the next node and what the policy said."""

    node: torch.Tensor  # [B, M] chosen child's index at level s+1
    action: torch.Tensor  # [B, M] in [0, b)
    log_probs: torch.Tensor  # [B, M, b]
    probs: torch.Tensor  # [B, M, b, H] each head's softmax over the children (head_entropy's input)
    scores: torch.Tensor  # [B, M, b, H] per-head attention scores (reused by the read-out)
    mask: torch.Tensor | None  # [B, M, b] children that exist (None: all of them)


def step(kv: TreeKV, q: torch.Tensor, s: int, node: torch.Tensor, mode: str = "greedy",
         action: torch.Tensor | None = None, generator: torch.Generator | None = None,
         ws: torch.Tensor | None = None, policy_dropout: float = 0.0) -> StepResult:
    """Descend one level from ``node`` (at level s) for every query; ``action`` overrides the choice.

    ``ws``: optional gather workspace from :func:`workspace` (inference only).
    ``policy_dropout``: the reference implementation's sampling, off by default: dropout on each head's
    probabilities before they are averaged, so the policy sampled from (and whose log-probability is
    reinforced) is a noisy, unnormalised weighting. A node whose every child weight is dropped is sampled
    uniformly (where the reference's sampler fails).
    """
    if not 0 <= s < kv.shape.k:
        raise ValueError(f"step {s} out of range for a tree of depth {kv.shape.k}")
    scores, mask = child_scores(kv, q, s, node, ws)
    probs = head_probs(scores, mask)  # [B, M, b, H]
    if policy_dropout > 0:
        probs = F.dropout(probs, policy_dropout)
    logp = policy_log_probs(probs, mask)
    a = choose(logp, mode, generator) if action is None else action
    return StepResult(node * kv.shape.b + a, a, logp, probs, scores, mask)


@dataclass
class Descent:
    """A whole root-to-leaf search for every query."""

    path: torch.Tensor  # [B, M, k+1] node index per level
    log_prob: torch.Tensor  # [B, M] sum over levels of log pi(chosen)
    entropy: torch.Tensor  # [B, M] mean over levels of the per-head entropy averaged over heads
    sib_logits: list[torch.Tensor]  # k x [B, M, b-1, H] read-out logits of the siblings (padding masked)

    b: int  # branch factor

    @property
    def actions(self) -> torch.Tensor:
        """``[B, M, k]`` the child chosen at each step (derived from the path rather than stored)."""
        return self.path[..., 1:] - self.b * self.path[..., :-1]


def descend(kv: TreeKV, q: torch.Tensor, mode: str = "greedy", actions: torch.Tensor | None = None,
            generator: torch.Generator | None = None, stats: bool = True, policy_dropout: float = 0.0) -> Descent:
    """Run :func:`step` k times (a loop over levels only). ``actions [B, M, k]`` replays a given path.

    ``stats=False`` skips the path log-probability and entropy (zeros), which greedy inference never uses.
    The entropy is averaged over levels (and, per level, over heads), as the reference's bonus is.
    """
    B, M = q.shape[:2]
    k = kv.shape.k
    path = torch.zeros(B, M, k + 1, dtype=torch.long, device=q.device)
    sib_logits = []
    log_prob = q.new_zeros(B, M)
    ent = q.new_zeros(B, M)
    ws = workspace(q, kv.shape.b)
    for s in range(k):
        r = step(kv, q, s, path[..., s], mode, None if actions is None else actions[..., s], generator, ws,
                 policy_dropout)
        if stats:
            log_prob = log_prob + r.log_probs.gather(-1, r.action.unsqueeze(-1)).squeeze(-1)
            ent = ent + head_entropy(r.probs)
        path[..., s + 1] = r.node
        sib_logits.append(sibling_logits(r.scores, r.mask, r.action.unsqueeze(-1)))
    if k > 0:
        ent = ent / k
    return Descent(path, log_prob, ent, sib_logits, kv.shape.b)


def sibling_positions(action: torch.Tensor, b: int) -> torch.Tensor:
    """Child positions ``[B, M, b-1]`` of the siblings not taken by ``action [B, M, 1]``, in order."""
    others = torch.arange(b - 1, device=action.device)
    return others + (others >= action)


def _step_action(path: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """``[B, M, 1]`` the child taken at step s of ``path [B, M, k+1]``."""
    return path[..., s + 1:s + 2] - b * path[..., s:s + 1]


def sibling_logits(scores: torch.Tensor, mask: torch.Tensor | None, action: torch.Tensor) -> torch.Tensor:
    """The read-out's logits of a level's unselected children (what :func:`readout` reuses from a search):
    keep the per-head scores ``[B, M, b, H]`` of the b-1 unselected children: ``[B, M, b-1, H]``.

    Padded siblings get a finite large negative logit (weight exactly 0 after the softmax).
    """
    b, H = scores.shape[2], scores.shape[3]
    pos = sibling_positions(action, b)  # [B, M, b-1]
    sib = scores.gather(2, pos.unsqueeze(-1).expand(*pos.shape, H))
    if mask is None:
        return sib
    return sib.masked_fill(~mask.gather(2, pos).unsqueeze(-1), masked_fill_value(scores.dtype))


@dataclass
class RetrievedSet:
    """S for every query: ``(b-1)*k`` siblings (level s+1 for s < k) then the P token slots.

    Attributes:
        level: ``[|S|]`` level of each slot's node, ``k + 1`` for token slots.
        index: ``[B, M, |S|]`` node index within its level, or token slot index.
        mask: ``[B, M, |S|]`` real entries (padded nodes and slots are False).
    """

    level: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor

    def embeddings(self, tree: Tree) -> torch.Tensor:
        """``[B, M, |S|, D]`` the embeddings of S (gathered; for inspection and tests)."""
        k = tree.shape.k
        parts = [_gather_rows(tree.nodes[lvl], self.index[..., self.level == lvl]) for lvl in range(1, k + 1)]
        parts.append(_gather_rows(tree.tokens, self.index[..., self.level == k + 1]))
        return torch.cat(parts, dim=2)


def retrieved_set(tree: Tree, path: torch.Tensor) -> RetrievedSet:
    """The retrieved set of each query's ``path [B, M, k+1]``."""
    shape = tree.shape
    b, k = shape.b, shape.k
    dev = path.device
    levels, idx, mask = [], [], []
    for s in range(k):
        sib = path[..., s:s + 1] * b + sibling_positions(_step_action(path, b, s), b)  # [B, M, b-1]
        levels.append(torch.full((b - 1,), s + 1, device=dev))
        idx.append(sib)
        mask.append(_gather_rows(tree.node_mask[s + 1], sib))
    tok = bucket_index(shape, path[..., k])  # [B, M, P]
    levels.append(torch.full((shape.P,), k + 1, device=dev))
    idx.append(tok)
    mask.append(_gather_rows(tree.token_mask, tok))
    return RetrievedSet(torch.cat(levels), torch.cat(idx, -1), torch.cat(mask, -1))


def readout(kv: TreeKV, q: torch.Tensor, path: torch.Tensor, descent: Descent | None = None,
            dropout: float = 0.0) -> torch.Tensor:
    """Multi-head attention of each query over its retrieved set: ``[B, M, H, dh]``.

    ``dropout``: probability of dropping each attention weight over S (training; never the policy's).

    The siblings' logits come from ``descent`` when given (the scores the policy already computed);
    otherwise they are recomputed from ``path``. Values are gathered one slot of S at a time and
    accumulated, so memory stays O(B*M*D) rather than O(B*M*|S|*D).
    """
    shape = kv.shape
    b, k = shape.b, shape.k
    ws = workspace(q, 1)
    if descent is not None and len(descent.sib_logits) == k:
        logits = list(descent.sib_logits)
    else:
        logits = []
        for s in range(k):
            sc, cm = child_scores(kv, q, s, path[..., s])
            logits.append(sibling_logits(sc, cm, _step_action(path, b, s)))
    leaf = path[..., k]  # [B, M]
    tok = bucket_index(shape, leaf)  # [B, M, P]
    # One slot at a time, so the workspace holds a single row per query.
    tok_scores = torch.cat([_scores(q, _gather_rows(kv.tok_keys, tok[..., j:j + 1], ws))
                            for j in range(shape.P)], dim=2)  # [B, M, P, H]
    tok_mask = _block_mask(kv.tok_mask, leaf, shape.P)  # [B, M, P]
    if tok_mask is not None:
        tok_scores = tok_scores.masked_fill(~tok_mask.unsqueeze(-1), masked_fill_value(q.dtype))
    logits.append(tok_scores)
    attn = _softmax(torch.cat(logits, dim=2))  # [B, M, |S|, H]
    if dropout > 0:
        attn = F.dropout(attn, dropout)
    attn = attn.unsqueeze(-1)  # [B, M, |S|, H, 1]
    del logits, tok_scores
    n = (b - 1) * k
    # Accumulate one slot of S at a time with an in-place multiply-add (autograd-safe: addcmul's
    # backward needs only its factors), so no [B, M, |S|, H, dh] tensor ever exists.
    out = torch.zeros_like(q)  # [B, M, H, dh]
    for j in range(shape.P):
        out.addcmul_(attn[:, :, n + j], _gather_rows(kv.tok_values, tok[..., j:j + 1], ws).squeeze(2))
    for s in range(k):
        sib = path[..., s:s + 1] * b + sibling_positions(_step_action(path, b, s), b)  # [B, M, b-1]
        for j in range(b - 1):
            v = _gather_rows(kv.values[s], sib[..., j:j + 1], ws).squeeze(2)  # [B, M, H, dh]
            out.addcmul_(attn[:, :, s * (b - 1) + j], v)
    return out


def greedy_readout(kv: TreeKV, q: torch.Tensor, with_path: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy inference in one call: the read-out ``[B, M, H, dh]`` over each query's greedy S (and its path)."""
    d = descend(kv, q, "greedy", stats=False)
    return readout(kv, q, d.path, d), d.path if with_path else None


def search_readout(kv: TreeKV, q: torch.Tensor, mode: str = "sample", actions: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, dropout: float = 0.0,
                   policy_dropout: float = 0.0) -> tuple[torch.Tensor, Descent]:
    """:func:`descend` then :func:`readout`, differentiable (the fused trainer's forward).

    Returns the read-out ``[B, M, H, dh]`` and the :class:`Descent`.
    """
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}; choose one of {SEARCH_MODES}")
    d = descend(kv, q, mode, actions, generator, policy_dropout=policy_dropout)
    return readout(kv, q, d.path, d, dropout), d


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 2, in place when no graph is recorded (inference memory)."""
    if torch.is_grad_enabled():
        return x.softmax(dim=2)
    x -= x.amax(dim=2, keepdim=True)
    x.exp_()
    return x.div_(x.sum(dim=2, keepdim=True))
