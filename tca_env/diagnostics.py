"""Where a greedy search goes wrong: each query's path against the ancestors of the token it needs.

Tasks that know which context token answers each query (:meth:`Task.target_tokens`: copy, recall) let us
check every level of the search: the node a query visits at level l is right when the token it needs lies
under it. That splits a model's errors into the search (the leaf misses the token) and the read-out (the
leaf holds it, the answer is still wrong)::

    ctx = model.prepare(batch)                          # with its tree (not lean)
    right, path = search_paths(ctx, task.target_tokens(batch))
    report = search_report(right, correct)              # leaf hit, per-level routing, accuracy on hit / miss

``benchmarks/search_report.py`` prints this for a checkpoint at any context size.
"""

from __future__ import annotations

import torch

from . import search as S
from .tree import take_rows


def search_paths(ctx, target: torch.Tensor, path: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy paths and, per level, whether the visited node holds the needed token.

    Args:
        ctx: a :class:`~tca_env.model.Context` with its tree (``model.prepare(batch)``, not ``lean``) and
            queries attached.
        target: ``[B, M]`` (or ``[M]``, the same for every set) index of the context token each query needs.
        path: the greedy paths if the caller already has them (``S.greedy_readout(..., with_path=True)``,
            whose read-out then serves the prediction too); None: searched here.

    Returns:
        ``right [B, M, k+1]`` (bool; level 0, the root, is always right) and the greedy ``path [B, M, k+1]``.
    """
    right = _right_path(ctx, target, "search_paths")
    if path is None:
        with torch.no_grad():
            _, path = S.greedy_readout(ctx.kv, ctx.q, with_path=True)  # [B, M, k+1] node per level
    return path == right, path


def _right_path(ctx, target: torch.Tensor, caller: str) -> torch.Tensor:
    """:func:`ancestors` of ``target`` (``[B, M]`` or ``[M]``) in ``ctx``'s tree, after checking both."""
    if ctx.tree is None:
        raise ValueError(f"{caller} needs the context's tree: build it with lean=False (model.prepare(batch))")
    B, M = ctx.q.shape[:2]
    if target.dim() == 1:
        target = target.expand(B, -1)
    if tuple(target.shape) != (B, M):
        raise ValueError(f"target must be [B, M] = [{B}, {M}] (or [M]); got {tuple(target.shape)}")
    return ancestors(ctx.tree, target)


def ancestors(tree, target: torch.Tensor) -> torch.Tensor:
    """The right path: ``[B, M, k+1]`` the node at each level above the token ``target [B, M]`` of each query
    (its leaf bucket at level k, the root 0 at level 0). ``tree``: a :class:`~tca_env.tree.Tree`."""
    shape, B = tree.shape, tree.perm.shape[0]
    # The slot of every context token, then the leaf bucket of each needed token and its ancestor per level.
    slot_of_token = torch.empty_like(tree.perm)
    slot_of_token.scatter_(1, tree.perm, shape.slot_index(tree.perm.device).expand(B, -1))
    leaf = slot_of_token.gather(1, target.to(tree.perm.device)) // shape.P  # [B, M]
    levels = torch.arange(shape.k + 1, device=leaf.device)
    return leaf.unsqueeze(-1) // shape.b ** (shape.k - levels)


def right_child_probs(ctx, target: torch.Tensor) -> torch.Tensor:
    """The search policy's probability of the right child at every level, along the right path: ``[B, M, k]``.

    Level l's entry is pi(right child | the right node at l - 1), the policy the search samples from (each
    head's softmax over the children, averaged over heads). Where a greedy search first goes wrong, its node
    is the right one, so this is the probability it gave the child it should have taken: near 0 means a
    confident error, which REINFORCE hardly corrects (the right child is rarely sampled, and the gradient on
    the sampled one scales with 1 - pi).
    """
    right = _right_path(ctx, target, "right_child_probs")
    actions = S.path_actions(right, ctx.kv.shape.b)  # [B, M, k]
    with torch.no_grad():
        return torch.stack([S.step(ctx.kv, ctx.q, s, right[..., s], "greedy", actions[..., s]).log_probs
                            .gather(-1, actions[..., s:s + 1]).squeeze(-1).exp() for s in range(ctx.kv.shape.k)], -1)


def split_margins(tree, coords: torch.Tensor, target: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """How close each query lies to the split it must get right, at every level of a k-d tree: ``[B, M, k]``.

    In a tree of the ``"kd"`` ordering, the tokens of a node at level l - 1 are sorted along coordinate
    ``(l - 1) % dx`` and dealt to its children in order, so the split between two neighbouring children lies
    between the largest coordinate of one and the smallest of the next (its boundary: their midpoint). Entry
    l - 1 is the distance of the query's coordinate to the nearest boundary of the right child at level l
    (the child holding the token it needs), divided by the extent of the right parent along that coordinate.
    Errors far from every boundary (margin near 0.25 on average) say the node embeddings do not encode the
    cell; errors at margins near 0 say they encode it but place the split imprecisely.

    Args:
        tree: the context's :class:`~tca_env.tree.Tree` (``model.prepare(batch).tree``), built with the kd ordering.
        coords: ``[B, N, dx]`` the coordinates the ordering used (``batch.xc``).
        target: ``[B, M]`` the token each query needs; queries: ``[B, M, dx]`` the query coordinates.
    """
    shape, B = tree.shape, tree.perm.shape[0]
    b, k = shape.b, shape.k
    dx = coords.shape[-1]
    right = ancestors(tree, target)  # [B, M, k+1]
    real = tree.token_mask  # [B, slots] real (not padding)
    slot = take_rows(coords, tree.token_index.clamp_min(0))  # [B, slots, dx]
    out = []
    for lv in range(1, k + 1):  # a loop over levels only
        c = (lv - 1) % dx
        x = slot[..., c].reshape(B, b**lv, -1)  # [B, nodes at lv, slots under each]
        m = real.reshape(B, b**lv, -1)
        lo = x.masked_fill(~m, float("inf")).amin(-1)  # [B, b^lv] each child's smallest coordinate
        hi = x.masked_fill(~m, float("-inf")).amax(-1)
        child = right[..., lv]  # [B, M]
        first = child - child % b  # the right parent's first child
        ext = hi.gather(1, first + b - 1) - lo.gather(1, first)  # children are sorted along c: the parent's extent
        xq = queries[..., c]
        dist = torch.full_like(xq, float("inf"))
        has_left, has_right = child % b > 0, child % b < b - 1
        left_b = (hi.gather(1, (child - 1).clamp_min(0)) + lo.gather(1, child)) / 2
        right_b = (hi.gather(1, child) + lo.gather(1, (child + 1).clamp_max(b**lv - 1))) / 2
        dist = torch.where(has_left, (xq - left_b).abs(), dist)
        dist = torch.where(has_right, torch.minimum(dist, (xq - right_b).abs()), dist)
        out.append(dist / ext.clamp_min(torch.finfo(ext.dtype).tiny))
    return torch.stack(out, -1)


#: a level's error counts as confident when the policy gave the right child less than this
CONFIDENT = 0.01
#: a query lies near its split when its margin (:func:`split_margins`) is below this share of the parent's extent
NEAR_SPLIT = 0.02


def search_report(right: torch.Tensor, correct: torch.Tensor | None = None,
                  p_right: torch.Tensor | None = None, margin: torch.Tensor | None = None) -> dict:
    """Summary of :func:`search_paths`' ``right [B, M, k+1]``, with the per-query ``correct [B, M]`` and the
    policy's ``p_right [B, M, k]`` (:func:`right_child_probs`) if given.

    Keys: ``levels`` (k); ``leaf_hit`` (share of queries whose leaf bucket holds their token);
    ``routing_per_level`` (level l = 1..k: the share routed right at l among those right at every level
    above); ``first_wrong_level_share`` (level l = 1..k: the share of all queries that first leave their
    token's ancestors at l); ``accuracy``, ``accuracy_if_hit`` and ``accuracy_if_missed`` (NaN where no
    query falls in the group); with ``p_right``: ``confident_errors_per_level`` (level l: of the queries
    that first go wrong at l, the share whose right child had probability below :data:`CONFIDENT`) and
    ``p_right_when_wrong_per_level`` (their median probability of the right child); with ``margin [B, M, k]``
    (:func:`split_margins`): ``near_split_errors_per_level`` (level l: of the queries that first go wrong at
    l, the share within :data:`NEAR_SPLIT` of the split) and ``near_split_all_per_level`` (the same share of
    all queries right at every level above l): boundary errors when the first is far above the second.
    """
    k = right.shape[-1] - 1
    hit = right.all(-1)
    above = right.cummin(-1).values  # right at every level up to and including l
    routing = []
    for lv in range(1, k + 1):
        reach = above[..., lv - 1]
        routing.append(right[..., lv][reach].float().mean().item() if reach.any() else float("nan"))
    levels = torch.arange(k + 1, device=right.device)
    first_wrong = torch.where(right, k + 1, levels).amin(-1)  # k + 1: never wrong
    out = {"levels": k, "queries": hit.numel(), "leaf_hit": hit.float().mean().item(),
           "routing_per_level": routing,
           "first_wrong_level_share": [(first_wrong == lv).float().mean().item() for lv in range(1, k + 1)]}
    if correct is not None:
        c = correct.float()

        def mean(x: torch.Tensor) -> float:
            return x.mean().item() if x.numel() else float("nan")

        out.update(accuracy=mean(c), accuracy_if_hit=mean(c[hit]), accuracy_if_missed=mean(c[~hit]))
    if p_right is not None:
        conf, med = [], []
        for lv in range(1, k + 1):
            p = p_right[..., lv - 1][first_wrong == lv].float()
            conf.append((p < CONFIDENT).float().mean().item() if p.numel() else float("nan"))
            med.append(p.median().item() if p.numel() else float("nan"))
        out.update(confident_errors_per_level=conf, p_right_when_wrong_per_level=med)
    if margin is not None:
        near_err, near_all = [], []
        for lv in range(1, k + 1):
            err, reach = margin[..., lv - 1][first_wrong == lv], margin[..., lv - 1][above[..., lv - 1]]
            near_err.append((err < NEAR_SPLIT).float().mean().item() if err.numel() else float("nan"))
            near_all.append((reach < NEAR_SPLIT).float().mean().item() if reach.numel() else float("nan"))
        out.update(near_split_errors_per_level=near_err, near_split_all_per_level=near_all)
    return out


def describe(report: dict) -> list[str]:
    """:func:`search_report` as printable lines (percentages)."""
    pct = " ".join
    lines = [f"greedy search over {report['levels']} levels, {report['queries']:,} queries: the leaf holds the "
             f"needed token for {100 * report['leaf_hit']:.2f}%"]
    if "accuracy" in report:
        lines.append(f"accuracy {100 * report['accuracy']:.2f}% ({100 * report['accuracy_if_hit']:.2f}% where the "
                     f"leaf holds it, {100 * report['accuracy_if_missed']:.2f}% elsewhere)")
    lines.append("routed right at level 1..k (of those right above): "
                 + pct(f"{100 * a:.1f}" for a in report["routing_per_level"]))
    lines.append("share of queries whose path first goes wrong at level 1..k: "
                 + pct(f"{100 * a:.1f}" for a in report["first_wrong_level_share"]))
    if "confident_errors_per_level" in report:
        lines.append(f"of those errors, the share made with p(right child) < {CONFIDENT:g}, level 1..k: "
                     + pct(f"{100 * a:.0f}" for a in report["confident_errors_per_level"]))
    if "near_split_errors_per_level" in report:
        lines.append(f"share within {NEAR_SPLIT:g} of the split (of the parent's extent), level 1..k: errors "
                     + pct(f"{100 * a:.0f}" for a in report["near_split_errors_per_level"]) + "; all queries "
                     + pct(f"{100 * a:.0f}" for a in report["near_split_all_per_level"]))
    return lines
