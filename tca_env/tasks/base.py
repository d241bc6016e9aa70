"""What every task provides: a :class:`Batch` of context and query tokens, and a :class:`Task` sampler.

Tasks are data and metrics only: they never import the model (imports point one way: tasks <- model).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HEADS = ("class", "reg", "normal")
ORDERINGS = ("natural", "coord", "projection", "kd")
REWARDS = ("acc", "nce", "ll", "mse")


@dataclass
class Batch:
    """B context sets of N tokens and M queries each, all on one device.

    Attributes:
        xc: ``[B, N, dx]`` context inputs; also the coordinates used to order the tree.
        yc: ``[B, N, dy]`` context values for meta-learning tasks (GP, images), ``None`` for sequences.
        xt: ``[B, M, dx]`` query inputs.
        yt: ``[B, M]`` class labels (long) for classification, ``[B, M, dy]`` floats for regression.
        pc: ``[N]`` integer positions of the context tokens (sinusoidal encoding), ``None`` if unordered.
        pt: ``[M]`` integer positions of the queries, ``None`` if unordered.
    """

    xc: torch.Tensor
    yc: torch.Tensor | None
    xt: torch.Tensor
    yt: torch.Tensor
    pc: torch.Tensor | None = None
    pt: torch.Tensor | None = None

    @property
    def B(self) -> int:  # noqa: N802 - the shape letters used throughout
        return self.xc.shape[0]

    @property
    def N(self) -> int:  # noqa: N802
        return self.xc.shape[1]

    @property
    def M(self) -> int:  # noqa: N802
        return self.xt.shape[1]

    @property
    def device(self) -> torch.device:
        return self.xc.device

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})

    def index(self, idx: torch.Tensor | slice) -> Batch:
        """The sub-batch of context sets ``idx`` (positions are shared, so they are kept whole)."""
        return replace(self, xc=self.xc[idx], yc=None if self.yc is None else self.yc[idx], xt=self.xt[idx],
                       yt=self.yt[idx])

    def validate(self) -> Batch:
        """Raise ``ValueError`` naming the problem if shapes disagree or values are not finite."""
        if self.xc.dim() != 3 or self.xt.dim() != 3:
            raise ValueError(f"xc and xt must be [B, N, dx] and [B, M, dx]; got {tuple(self.xc.shape)} and "
                             f"{tuple(self.xt.shape)}")
        B, N, _ = self.xc.shape
        if B == 0:
            raise ValueError("empty batch: B = 0 context sets")
        if N == 0:
            raise ValueError("empty context: N = 0 tokens (need N >= 1)")
        if self.xt.shape[0] != B or self.yt.shape[0] != B:
            raise ValueError(f"batch sizes disagree: xc {B}, xt {self.xt.shape[0]}, yt {self.yt.shape[0]}")
        if self.M == 0:
            raise ValueError("no queries: M = 0")
        if self.yt.shape[1] != self.M:
            raise ValueError(f"yt has {self.yt.shape[1]} targets for {self.M} queries")
        if self.yc is not None and (self.yc.dim() != 3 or self.yc.shape[:2] != (B, N)):
            raise ValueError(f"yc must be [B, N, dy] = [{B}, {N}, dy]; got {tuple(self.yc.shape)}")
        if self.pc is not None and self.pc.shape[-1] != N:
            raise ValueError(f"pc has {self.pc.shape[-1]} positions for {N} context tokens")
        if self.pt is not None and self.pt.shape[-1] != self.M:
            raise ValueError(f"pt has {self.pt.shape[-1]} positions for {self.M} queries")
        for name in ("xc", "yc", "xt", "yt"):
            t = getattr(self, name)
            if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"batch.{name} contains NaN or inf")
        return self


class Task(ABC):
    """A task samples batches and says how its predictions are judged.

    Class attributes a subclass sets:
        name: registry name.
        head: ``"class"`` (logits over ``out_dim`` classes), ``"reg"`` (mean) or ``"normal"`` (mean, std).
        x_dim: dimension of ``xc`` / ``xt``; y_dim: dimension of ``yc`` (0 when there is none).
        out_dim: number of classes, or the target dimension.
        ordering: default tree ordering (one of ``ORDERINGS``); reward: default reward (one of ``REWARDS``).
        sequential: whether tokens carry positions (``pc`` / ``pt``) for a sinusoidal encoding.
    """

    name: str = ""
    head: str = "class"
    x_dim: int = 1
    y_dim: int = 0
    out_dim: int = 1
    ordering: str = "natural"
    reward: str = "acc"
    std_form: str = "exp"
    """How a Normal head turns its raw output into a standard deviation: "exp" or "bounded"."""
    sequential: bool = False
    size_options: tuple[str, ...] = ()
    """Constructor options that set only how big a sample is (e.g. the recall task's context_len): a trained
    predictor may be run with other values of these (generalising across sizes is the point), while any
    other option that differs from its training task is a contradiction."""
    model_defaults: dict[str, Any] = {}
    """ModelConfig fields this task's models take unless told otherwise (e.g. the recall task's model has no
    context encoder)."""
    eval_splits: tuple[str, ...] = ("test",)
    """Splits the trainer evaluates on (each a fixed, seeded set passed to ``sample(split=...)``)."""

    @property
    @abstractmethod
    def max_context(self) -> int:
        """Largest number of context tokens a batch can have (the denominator of the paper's % tokens)."""

    @property
    def max_position(self) -> int:
        """Largest position index + 1 (sequential tasks)."""
        return 0

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu",
               split: str = "train") -> Batch:
        """Draw ``batch_size`` tasks with ``generator`` (a CPU generator, so results do not depend on device)."""

    def target_tokens(self, batch: Batch) -> torch.Tensor | None:
        """The context token each query needs, ``[B, M]`` indices into the context, where the task knows it
        (the copy task does); None otherwise. It defines the correct-leaf reference policy."""
        return None

    def figure_batch(self, generator: torch.Generator, device: torch.device | str = "cpu") -> Batch:
        """Tasks to draw in :meth:`figure` (default: 4 from the first evaluation split)."""
        return self.sample(4, generator, device, split=self.eval_splits[0])

    def figure(self, batch: Batch, out: torch.Tensor, head: Any) -> Figure | None:
        """A picture of the predictions ``out`` (raw head output ``[B, M, ...]``) on ``batch``.

        ``head`` is the model's output head (``head.mean_std(out)`` for a Normal head, ``head.point(out)``);
        it is passed in rather than imported, since tasks never import the model. The trainer logs the
        figure to TensorBoard at every evaluation and ``tca eval --png`` saves it. Default: no figure.
        """
        return None

    def eval_batches(self, num: int, batch_size: int, seed: int, device: torch.device | str = "cpu",
                     split: str = "test") -> list[Batch]:
        """A fixed evaluation set: the same ``num`` tasks for the same seed, run after run."""
        if num <= 0 or batch_size <= 0:
            raise ValueError(f"eval set needs num > 0 and batch_size > 0; got {num}, {batch_size}")
        g = torch.Generator().manual_seed(seed)
        out, left = [], num
        while left > 0:
            n = min(batch_size, left)
            out.append(self.sample(n, g, device, split=split))
            left -= n
        return out


def summarize_metric(per_batch: list[torch.Tensor]) -> tuple[float, float]:
    """The two averages of a per-query metric over evaluation batches (each ``[B, M]`` or any shape).

    Returns ``(batch_mean, pooled)``: the mean over batches of each batch's mean (the paper's reported
    metric: every batch weighs the same, whatever its number of targets) and the mean over all queries
    pooled together (batches with many targets weigh more). With varying batch sizes (the GP and image
    protocols draw N and M per batch) the two differ: batches with many targets have few context points,
    so the pooled mean is the lower one.
    """
    if not per_batch:
        raise ValueError("no evaluation batches to average")
    means = [float(m.float().mean()) for m in per_batch]
    total = sum(float(m.float().sum()) for m in per_batch)
    count = sum(m.numel() for m in per_batch)
    return sum(means) / len(means), total / count
