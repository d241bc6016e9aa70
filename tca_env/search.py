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
from .tree import Tree, TreeShape, gather_rows

SEARCH_MODES = ("greedy", "sample")


def _project_rows(project, parts: list[torch.Tensor], chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``project`` of ``parts`` (``[B, n_i, D]`` each) concatenated along dim 1 -> keys, values ``[B, sum n_i, H, dh]``.

    ``chunk``: at most this many rows per call, written into preallocated tables (the temporaries stay small
    in cache; values do not change). None: one call.
    """
    B, total = parts[0].shape[0], sum(x.shape[1] for x in parts)
    if chunk is None or B * total <= chunk:
        return project(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
    step, nk, nv, r = max(1, chunk // B), None, None, 0
    for x in parts:
        for i in range(0, x.shape[1], step):
            k_, v_ = project(x[:, i:i + step])
            if nk is None:
                nk, nv = k_.new_empty(B, total, *k_.shape[2:]), v_.new_empty(B, total, *v_.shape[2:])
            nk[:, r:r + k_.shape[1]], nv[:, r:r + k_.shape[1]] = k_, v_
            r += k_.shape[1]
    return nk, nv


@dataclass
class TreeKV:
    """Keys and values of every node below the root and of every token slot, projected once per tree.

    The nodes of levels 1..k sit in one table, level by level (level l starts at row
    ``shape.offset(l)``), so the children of a node are one aligned block of b rows and every step of the
    search, and the read-out's whole retrieved set, is one gather from the same table.

    Attributes:
        shape: the tree's sizes.
        node_keys / node_values: ``[B, R, H, dh]`` with R = b + ... + b^k.
        node_mask: ``[B, R]`` which nodes are real (None: all of them, as in every tree :func:`build_tree`
            makes: it puts at least one token under every node).
        tok_keys / tok_values: ``[B, P*b^k, H, dh]`` token slots; tok_mask ``[B, P*b^k]`` (None: no padding).
    """

    shape: TreeShape
    node_keys: torch.Tensor
    node_values: torch.Tensor
    node_mask: torch.Tensor | None
    tok_keys: torch.Tensor
    tok_values: torch.Tensor
    tok_mask: torch.Tensor | None

    @classmethod
    def from_tree(cls, tree: Tree, project, tok_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                  chunk: int | None = None) -> TreeKV:
        """Project with ``project(x [.., D]) -> (k, v) [.., H, dh]``; ``tok_kv`` reuses token projections.

        ``chunk``: project at most this many rows per call into preallocated tables (bounds the temporaries
        at large N; values do not change). None: one projection of all the nodes and one of all the tokens.
        """
        shape = tree.shape
        nk, nv = _project_rows(project, tree.nodes[1:] or [tree.tokens[:, :0]], chunk)
        tk, tv = _project_rows(project, [tree.tokens], chunk) if tok_kv is None else tok_kv
        # Contiguous tables: every gather views a table as blocks of rows, which must not copy it.
        nk, nv, tk, tv = nk.contiguous(), nv.contiguous(), tk.contiguous(), tv.contiguous()
        padded = any(shape.padded(lvl) for lvl in range(1, shape.k + 1))
        node_mask = torch.cat(tree.node_mask[1:], 1) if padded else None
        tok_mask = None if shape.n == shape.num_slots else tree.token_mask
        return cls(shape, nk, nv, node_mask, tk, tv, tok_mask)


def workspace(q: torch.Tensor, rows_per_query: int) -> torch.Tensor | None:
    """A flat gather buffer for ``rows_per_query`` rows of width H*dh per query, or None under autograd."""
    if torch.is_grad_enabled():
        return None
    return q.new_empty(q.shape[0] * q.shape[1] * rows_per_query * q.shape[2] * q.shape[3])


def gather_block(table: torch.Tensor, parent: torch.Tensor, c: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``parent*c .. parent*c + c-1`` of ``table [B, R, ...]`` for ``parent [B, M]``: ``[B, M, c, ...]``.

    Children of a node (and slots of a bucket) are contiguous rows, so one index per query fetches
    all of them: a single index_select of ``c``-row blocks (into the workspace ``out`` when given).
    """
    B, R = table.shape[:2]
    rows = gather_rows(table.reshape(B, R // c, -1), parent.unsqueeze(-1), out)
    return rows.view(*parent.shape, c, *table.shape[2:])


def bucket_index(shape: TreeShape, leaf: torch.Tensor) -> torch.Tensor:
    """Token slots of leaf bucket ``leaf [B, M]``: ``[B, M, P]``."""
    return leaf.unsqueeze(-1) * shape.P + torch.arange(shape.P, device=leaf.device)


def child_scores(kv: TreeKV, q: torch.Tensor, s: int, node: torch.Tensor,
                 ws: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head scores of queries ``q [B, M, H, dh]`` (pre-scaled) over the children of ``node [B, M]``.

    Returns scores ``[B, M, b, H]`` and the children's mask ``[B, M, b]`` (None: no padded child).
    """
    b = kv.shape.b
    block = node + kv.shape.offset(s + 1) // b  # the children's block of rows in the node table
    mask = None if kv.node_mask is None else gather_block(kv.node_mask, block, b)
    return _scores(q, gather_block(kv.node_keys, block, b, ws)), mask


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
    if scores.shape[2] == 2:
        # Two children: the softmax is the sigmoid of the score difference, each child's from its own sign (so
        # a tiny probability keeps its precision). Same values; ~10x faster than a softmax over a dim of size 2
        # (1.22 ms against 0.11 ms for 16,384 queries), 1.1 us of the 9.7 us per query at N = 2^20.
        d = scores[:, :, 0] - scores[:, :, 1]
        probs = torch.sigmoid(torch.stack([d, -d], 2))
    else:
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


def choose(log_probs: torch.Tensor, mode: str, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy (argmax) or sampled (Gumbel-max, exact for the categorical) child: ``[B, M]``.

    ``noise``: Gumbel samples shaped like ``log_probs`` drawn beforehand (else drawn here from ``generator``)."""
    if mode == "greedy":
        return log_probs.argmax(-1)
    if mode != "sample":
        raise ValueError(f"unknown search mode {mode!r}; choose one of {SEARCH_MODES}")
    if noise is None:
        noise = gumbel_noise(log_probs.shape, log_probs, generator)
    return (log_probs.detach() + noise).argmax(-1)


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
         policy_dropout: float = 0.0, ws: torch.Tensor | None = None,
         noise: torch.Tensor | None = None) -> StepResult:
    """Descend one level from ``node`` (at level s) for every query; ``action`` overrides the choice.

    The one definition of a search step: the environment calls it once per level, :func:`descend` k times.
    ``policy_dropout``: the reference implementation's sampling, off by default: dropout on each head's
    probabilities before they are averaged, so the policy sampled from (and whose log-probability is
    reinforced) is a noisy, unnormalised weighting. A node whose every child weight is dropped is sampled
    uniformly (where the reference's sampler fails). ``ws``: optional gather workspace from :func:`workspace`
    (inference only). ``noise [B, M, b]``: Gumbel samples for a sampled choice, drawn beforehand.
    """
    if not 0 <= s < kv.shape.k:
        raise ValueError(f"step {s} out of range for a tree of depth {kv.shape.k}")
    scores, mask = child_scores(kv, q, s, node, ws)
    probs = head_probs(scores, mask)  # [B, M, b, H]
    if policy_dropout > 0:
        probs = F.dropout(probs, policy_dropout)
    logp = policy_log_probs(probs, mask)
    a = choose(logp, mode, generator, noise) if action is None else action
    return StepResult(node * kv.shape.b + a, a, logp, probs, scores, mask)


@dataclass
class Descent:
    """A whole root-to-leaf search for every query."""

    path: torch.Tensor  # [B, M, k+1] node index per level
    log_prob: torch.Tensor  # [B, M] sum over levels of log pi(chosen)
    entropy: torch.Tensor  # [B, M] mean over levels of the per-head entropy averaged over heads
    scores: list[torch.Tensor]  # k x [B, M, b, H] per-head scores of each level's children (the read-out reuses them)

    b: int  # branch factor

    @property
    def actions(self) -> torch.Tensor:
        """``[B, M, k]`` the child chosen at each step (derived from the path rather than stored)."""
        return path_actions(self.path, self.b)


def path_actions(path: torch.Tensor, b: int) -> torch.Tensor:
    """The child taken at each step of ``path [..., k+1]`` (node index per level): ``[..., k]``."""
    return path[..., 1:] - b * path[..., :-1]


def descend(kv: TreeKV, q: torch.Tensor, mode: str = "greedy", actions: torch.Tensor | None = None,
            generator: torch.Generator | None = None, stats: bool = True, policy_dropout: float = 0.0,
            noise: torch.Tensor | None = None) -> Descent:
    """Run :func:`step` k times (a loop over levels only). ``actions [B, M, k]`` replays a given path.

    A sampled search draws its Gumbel noise for all levels at once, ``[k, B, M, b]`` from ``generator`` (the
    same numbers as k draws of ``[B, M, b]``, one per step), or takes ``noise`` of that shape drawn
    beforehand: what lets ``torch.compile`` trace the search.

    ``stats=False`` skips the path log-probability and entropy (zeros), which greedy inference never uses.
    The entropy is averaged over levels (and, per level, over heads), as the reference's bonus is.
    """
    B, M = q.shape[:2]
    k = kv.shape.k
    nodes = [torch.zeros(B, M, dtype=torch.long, device=q.device)]
    scores, logps, probs = [], [], []
    ws = workspace(q, kv.shape.b)
    if mode == "sample" and actions is None and noise is None:
        noise = gumbel_noise((k, B, M, kv.shape.b), q, generator)
    for s in range(k):
        r = step(kv, q, s, nodes[-1], mode, None if actions is None else actions[..., s], generator, policy_dropout,
                 ws, None if noise is None else noise[s])
        nodes.append(r.node)
        scores.append(r.scores)
        if stats:
            logps.append(r.log_probs)
            probs.append(r.probs)
    path = torch.stack(nodes, -1)  # [B, M, k+1]
    if stats and k > 0:  # once for all levels: [B, M, k, b] and [B, M, k, b, H]
        acts = path_actions(path, kv.shape.b)
        log_prob = torch.stack(logps, 2).gather(-1, acts.unsqueeze(-1)).squeeze(-1).sum(-1)
        p = torch.stack(probs, 2)
        ent = -(p * (p + 1e-9).log()).sum(3).mean((-2, -1))  # head_entropy averaged over levels
    else:
        log_prob = ent = q.new_zeros(B, M)
    return Descent(path, log_prob, ent, scores, kv.shape.b)


def sibling_positions(action: torch.Tensor, b: int) -> torch.Tensor:
    """Child positions ``[..., b-1]`` of the siblings not taken by ``action [..., 1]``, in order."""
    others = torch.arange(b - 1, device=action.device)
    return others + (others >= action)


def _sibling_rows(shape: TreeShape, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``path [B, M, k+1]``: the child positions ``[B, M, k, b-1]`` of the siblings passed over at each
    level, and their rows ``[B, M, k*(b-1)]`` in the node table of :class:`TreeKV` (level by level)."""
    b, k = shape.b, shape.k
    parent = path[..., :-1]  # [B, M, k]
    pos = sibling_positions((path[..., 1:] - b * parent).unsqueeze(-1), b)  # [B, M, k, b-1]
    first = torch.tensor([shape.offset(s + 1) for s in range(k)], device=path.device)  # [k]
    rows = ((parent * b + first).unsqueeze(-1) + pos).flatten(2)
    return pos, rows


def sibling_logits(scores: list[torch.Tensor], pos: torch.Tensor) -> torch.Tensor:
    """The read-out's logits of the unselected children, reused from the search: per-level scores
    ``k x [B, M, b, H]`` and sibling positions ``[B, M, k, b-1]`` -> ``[B, M, k*(b-1), H]``."""
    sc = torch.stack(scores, 2)  # [B, M, k, b, H]
    return sc.gather(3, pos.unsqueeze(-1).expand(*pos.shape, sc.shape[-1])).flatten(2, 3)


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
        parts = [gather_rows(tree.nodes[lvl], self.index[..., self.level == lvl]) for lvl in range(1, k + 1)]
        parts.append(gather_rows(tree.tokens, self.index[..., self.level == k + 1]))
        return torch.cat(parts, dim=2)


def retrieved_set(tree: Tree, path: torch.Tensor) -> RetrievedSet:
    """The retrieved set of each query's ``path [B, M, k+1]`` (for inspection and tests; a loop over levels)."""
    shape = tree.shape
    b, k = shape.b, shape.k
    dev = path.device
    levels, idx, mask = [], [], []
    for s in range(k):
        act = path[..., s + 1:s + 2] - b * path[..., s:s + 1]
        sib = path[..., s:s + 1] * b + sibling_positions(act, b)  # [B, M, b-1]
        levels.append(torch.full((b - 1,), s + 1, device=dev))
        idx.append(sib)
        mask.append(gather_rows(tree.node_mask[s + 1], sib))
    tok = bucket_index(shape, path[..., k])  # [B, M, P]
    levels.append(torch.full((shape.P,), k + 1, device=dev))
    idx.append(tok)
    mask.append(gather_rows(tree.token_mask, tok))
    return RetrievedSet(torch.cat(levels), torch.cat(idx, -1), torch.cat(mask, -1))


def readout(kv: TreeKV, q: torch.Tensor, path: torch.Tensor, descent: Descent | None = None,
            dropout: float = 0.0) -> torch.Tensor:
    """Multi-head attention of each query over its retrieved set: ``[B, M, H, dh]``.

    ``dropout``: probability of dropping each attention weight over S (training; never the policy's).

    The siblings' logits come from ``descent`` when given (the scores the policy already computed);
    otherwise they are recomputed from ``path``. The keys and values of the leaf's P slots are one gather
    each, and the siblings' values one gather under autograd; without it they are gathered and weighted in one
    ``embedding_bag`` (:func:`_bag_sum`), so that inference never holds them as a ``[B, M, |S|, H, dh]`` tensor.
    The op count is constant in P, b and N and grows with k only through the per-level scores.
    """
    shape = kv.shape
    b, k = shape.b, shape.k
    leaf = path[..., k]  # [B, M]
    n = (b - 1) * k
    ws = workspace(q, shape.P)  # reused by the keys' and then the values' gather (inference)
    tok_scores = _scores(q, gather_block(kv.tok_keys, leaf, shape.P, ws))  # [B, M, P, H]
    tok_mask = None if kv.tok_mask is None else gather_block(kv.tok_mask, leaf, shape.P)  # [B, M, P]
    if tok_mask is not None:
        tok_scores = tok_scores.masked_fill(~tok_mask.unsqueeze(-1), masked_fill_value(q.dtype))
    if k == 0:
        logits, sib_rows = tok_scores, None
    else:
        pos, sib_rows = _sibling_rows(shape, path)
        scores = descent.scores if descent is not None and len(descent.scores) == k else \
            [child_scores(kv, q, s, path[..., s])[0] for s in range(k)]
        sib = sibling_logits(scores, pos)  # [B, M, k*(b-1), H]
        if kv.node_mask is not None:
            sib = sib.masked_fill(~gather_rows(kv.node_mask, sib_rows).unsqueeze(-1), masked_fill_value(q.dtype))
        logits = torch.cat([sib, tok_scores], 2)
    attn = _softmax(logits)  # [B, M, |S|, H]
    if dropout > 0:
        attn = F.dropout(attn, dropout)
    out = _weighted(attn[:, :, n:], gather_block(kv.tok_values, leaf, shape.P, ws))
    if sib_rows is None:
        return out
    if torch.is_grad_enabled():  # training: one gather of every sibling's values (its backward is one index_add;
        # embedding_bag's backward made a recall training step at N = 1,024 ~15% slower)
        return out + _weighted(attn[:, :, :n], gather_rows(kv.node_values, sib_rows))
    return out.add_(_bag_sum(kv.node_values, sib_rows, attn[:, :, :n]))


def _bag_sum(table: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_s w[b, m, s, h] table[b, rows[b, m, s], h, :]``: table ``[B, R, H, dh]``, rows ``[B, M, S]``, weights
    ``[B, M, S, H]`` -> ``[B, M, H, dh]``, as one ``embedding_bag`` (the read-out's inference path).

    Each head's dh-slice of a row is a row of the bag table, and each (query, head) a bag of its S rows: the
    gathered values never exist as ``[B, M, S, H, dh]``. It replaced gathering them level by level into a
    workspace and weighting each level: greedy inference (``ReTreever.query``, 16,384 queries, one thread) went
    from 9.10 to 8.13 us per query at 2^20 tokens and from 7.32 to 6.25 at 2^16 (medians of 7 alternations, with
    64-bit indices; the 32-bit ones below came after and were measured for memory only).
    """
    B, R, H, dh = table.shape
    M, S = rows.shape[1:]
    # 32-bit indices where the bag table allows (half the index memory: these are the path's largest temporaries)
    itype = torch.int32 if B * R * H < 2**31 else torch.long
    first = (torch.arange(B, device=rows.device) * (R * H)).view(B, 1, 1, 1).to(itype)
    idx = (rows.to(itype).unsqueeze(2) * H + first + torch.arange(H, device=rows.device, dtype=itype).view(1, 1, H, 1))
    bag = F.embedding_bag(idx.view(B * M * H, S), table.reshape(B * R * H, dh),
                          per_sample_weights=w.transpose(2, 3).reshape(-1, S), mode="sum")
    return bag.view(B, M, H, dh)


def _weighted(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_s w[.., s, h] v[.., s, h, :]``: weights ``[B, M, S, H]``, freshly gathered values ``[B, M, S, H, dh]``
    (multiplied in place without autograd)."""
    if torch.is_grad_enabled():
        return (w.unsqueeze(-1) * v).sum(2)
    return v.mul_(w.unsqueeze(-1)).sum(2)


#: queries per call of :func:`greedy_readout` (bounds its gather workspaces, which grow with the queries)
greedy_chunk = 16384


def chunk_columns(batch_size: int) -> int:
    """Queries per context set in one chunk of about :data:`greedy_chunk` (the greedy read-out's and the
    compiled ``ReTreever.query``'s chunks)."""
    return max(1, greedy_chunk // batch_size)


def greedy_readout(kv: TreeKV, q: torch.Tensor, with_path: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy inference: the read-out ``[B, M, H, dh]`` over each query's greedy S (and its path).

    Queries go through in chunks of about :data:`greedy_chunk` (the values of S gathered at once are
    ``|S|`` rows per query); chunking changes no value.
    """
    B, M = q.shape[:2]
    cols = chunk_columns(B)
    if M <= cols:
        d = descend(kv, q, "greedy", stats=False)
        return readout(kv, q, d.path, d), d.path if with_path else None
    outs, paths = [], []
    for m0 in range(0, M, cols):
        o, p = greedy_readout(kv, q[:, m0:m0 + cols], with_path)
        outs.append(o)
        paths.append(p)
    return torch.cat(outs, 1), torch.cat(paths, 1) if with_path else None


def search_readout(kv: TreeKV, q: torch.Tensor, mode: str = "sample", actions: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, dropout: float = 0.0,
                   policy_dropout: float = 0.0, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, Descent]:
    """:func:`descend` then :func:`readout`, differentiable (the fused trainer's forward).

    Returns the read-out ``[B, M, H, dh]`` and the :class:`Descent`.
    """
    if mode not in SEARCH_MODES:
        raise ValueError(f"unknown search mode {mode!r}; choose one of {SEARCH_MODES}")
    d = descend(kv, q, mode, actions, generator, policy_dropout=policy_dropout, noise=noise)
    return readout(kv, q, d.path, d, dropout), d


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 2, in place when no graph is recorded (inference memory)."""
    if torch.is_grad_enabled():
        return x.softmax(dim=2)
    x -= x.amax(dim=2, keepdim=True)
    # Floor at -80 (weights below e^-80 ~ 2e-35 relative to the largest, nothing a float32 sum can hold): exp
    # of a denormal result is ~8x slower here, and confident searches give many (0.6 us per query at 2^20).
    x.clamp_(min=-80.0).exp_()
    return x.div_(x.sum(dim=2, keepdim=True))
