"""1-D Gaussian-process meta-regression (the paper's "GP regression" experiment).

Each task is one function drawn from a zero-mean GP. Per batch, N ~ U{3..46} context points and
M ~ U{3..49-N} targets (one N and one M for the whole batch, drawn from the generator); per task,
x ~ U[-2, 2], length-scale l ~ U[0.1, 0.6] and output scale s ~ U[0.1, 1]. The N + M values are
drawn jointly, so context and targets come from the same function:

    y ~ Normal(0, K + noise_std^2 I),   K_ij = s^2 k(|x_i - x_j| / l)

The observation noise is a *standard deviation* of 0.02 (variance 4e-4), added to context and
targets alike; this is how the TNP / TCA reference samplers read "noise 0.02" (they add
``sigma_eps ** 2 * I`` with ``sigma_eps = 2e-2``). Likewise the output scale is a standard
deviation: the kernel's variance is ``s ** 2``.

Train on ``kernel="rbf"``; the paper's out-of-distribution evaluation uses Matern-5/2. Splits
``"train"`` and ``"test"`` draw from the task's kernel; a kernel name as the split (``"matern52"``,
``"rbf"``) draws from that kernel instead, so one task evaluates both columns of the paper's table
(``eval_splits`` is ``("test", <the other kernel>)``).
This module also holds :func:`context_target_sizes`, the N / M protocol shared with the image tasks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .base import Batch, Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KERNELS = ("rbf", "matern52")
SPLITS = ("train", "test") + KERNELS


def context_target_sizes(generator: torch.Generator, min_points: int, max_context: int, max_total: int,
                         num_context: int | None = None, num_target: int | None = None) -> tuple[int, int]:
    """Draw the batch's (N, M): N ~ U{min_points..max_context}, M ~ U{min_points..max_total-N}.

    ``num_context`` / ``num_target`` fix N / M instead of drawing them (tests, fixed-size evaluation).
    The generator is advanced the same way whether or not sizes are fixed, so fixing one size does
    not change the rest of the stream.
    """
    n = int(torch.randint(min_points, max_context + 1, (), generator=generator))
    n = n if num_context is None else num_context
    m = int(torch.randint(min_points, max_total - n + 1, (), generator=generator))
    m = m if num_target is None else num_target
    return n, m


def check_sizes(task: str, min_points: int, max_context: int, max_total: int, num_context: int | None,
                num_target: int | None) -> None:
    """Raise ``ValueError`` unless the size protocol can always be satisfied."""
    if min_points < 1:
        raise ValueError(f"{task}: min_points must be >= 1; got {min_points}")
    if max_context < min_points:
        raise ValueError(f"{task}: max_context ({max_context}) must be >= min_points ({min_points})")
    if max_total < max_context + min_points:
        raise ValueError(f"{task}: max_total ({max_total}) must be >= max_context + min_points "
                         f"({max_context + min_points}) so every N leaves room for min_points targets")
    if num_context is not None and not min_points <= num_context <= max_context:
        raise ValueError(f"{task}: num_context must be in [{min_points}, {max_context}]; got {num_context}")
    if num_target is not None:
        n_max = max_context if num_context is None else num_context
        if not min_points <= num_target <= max_total - n_max:
            raise ValueError(f"{task}: num_target must be in [{min_points}, {max_total - n_max}] "
                             f"(max_total - N); got {num_target}")


def kernel_matrix(x1: torch.Tensor, x2: torch.Tensor, length: torch.Tensor, scale: torch.Tensor,
                  kernel: str = "rbf") -> torch.Tensor:
    """Noise-free covariance ``s^2 k(|x1_i - x2_j| / l)`` for a batch of tasks.

    Args:
        x1: ``[B, N1, dx]`` inputs; x2: ``[B, N2, dx]`` inputs.
        length: ``[B]`` length-scales; scale: ``[B]`` output scales (standard deviations).
        kernel: ``"rbf"`` (exp(-d^2 / 2)) or ``"matern52"`` ((1 + sqrt5 d + 5 d^2 / 3) exp(-sqrt5 d)).

    Returns:
        ``[B, N1, N2]`` covariance, in the dtype of ``x1``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown GP kernel {kernel!r}; known kernels: {KERNELS}")
    d = torch.cdist(x1, x2) / length[:, None, None]  # [B, N1, N2]
    if kernel == "rbf":
        k = torch.exp(-0.5 * d.square())
    else:
        r = math.sqrt(5.0) * d
        k = (1.0 + r + r.square() / 3.0) * torch.exp(-r)
    return scale[:, None, None].square() * k


def sample_gp(x: torch.Tensor, length: torch.Tensor, scale: torch.Tensor, kernel: str, noise_std: float,
              generator: torch.Generator, jitter: float = 1e-6) -> torch.Tensor:
    """Draw noisy GP values at ``x`` jointly for every task: ``y = chol(K + noise_std^2 I) eps``.

    The Cholesky factorization runs in float64 with ``jitter`` added to the diagonal (negligible next
    to the noise variance, but it keeps ``noise_std = 0`` factorizable).

    Args:
        x: ``[B, N, dx]`` inputs; length, scale: ``[B]``; generator: CPU generator for ``eps``.

    Returns:
        ``[B, N, 1]`` values, in the dtype of ``x``.
    """
    B, N, _ = x.shape
    cov = kernel_matrix(x.double(), x.double(), length.double(), scale.double(), kernel)  # [B, N, N]
    cov = cov + (noise_std ** 2 + jitter) * torch.eye(N, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)  # [B, N, N]
    eps = torch.randn(B, N, 1, generator=generator, dtype=torch.float64)
    return (chol @ eps).to(x.dtype)  # [B, N, 1]


class GPTask(Task):
    """GP meta-regression: predict a Normal at M target inputs from N noisy (x, y) context pairs.

    Args:
        kernel: ``"rbf"`` (training and in-distribution evaluation) or ``"matern52"``.
        num_context: fix N for every batch instead of drawing it.
        num_target: fix M for every batch instead of drawing it.
        min_points, max_context, max_total: N ~ U{min_points..max_context},
            M ~ U{min_points..max_total-N} (paper: 3, 46, 49).
        x_range: inputs are uniform on this interval.
        length_range, scale_range: per-task length-scale and output scale (std) are uniform on these.
        noise_std: observation noise standard deviation (variance ``noise_std ** 2``).

    The ``split`` argument of :meth:`sample` accepts ``"train"`` and ``"test"``, which draw from the
    same distribution (the generator makes them differ), or a kernel name, which draws from that
    kernel (out-of-distribution evaluation).
    """

    name = "gp"
    head = "normal"
    x_dim = 1
    y_dim = 1
    out_dim = 1
    ordering = "coord"
    reward = "ll"
    sequential = False
    # Fixing N or M (within the trained ranges) changes how many points a sample has, not the problem: a
    # trained predictor runs with them (e.g. a fixed M for the lockstep vector env agents train on).
    size_options = ("num_context", "num_target")

    def __init__(self, kernel: str = "rbf", num_context: int | None = None, num_target: int | None = None,
                 min_points: int = 3, max_context: int = 46, max_total: int = 49,
                 x_range: tuple[float, float] = (-2.0, 2.0), length_range: tuple[float, float] = (0.1, 0.6),
                 scale_range: tuple[float, float] = (0.1, 1.0), noise_std: float = 0.02):
        if kernel not in KERNELS:
            raise ValueError(f"gp task: unknown kernel {kernel!r}; known kernels: {KERNELS}")
        check_sizes("gp task", min_points, max_context, max_total, num_context, num_target)
        for arg, (lo, hi), positive in (("x_range", x_range, False), ("length_range", length_range, True),
                                        ("scale_range", scale_range, True)):
            if not lo <= hi or (positive and lo <= 0):
                raise ValueError(f"gp task: {arg} must be (lo, hi) with lo <= hi"
                                 f"{' and lo > 0' if positive else ''}; got {(lo, hi)}")
        if noise_std < 0:
            raise ValueError(f"gp task: noise_std must be >= 0; got {noise_std}")
        self.kernel = kernel
        self.eval_splits = ("test",) + tuple(k for k in KERNELS if k != kernel)
        self.num_context, self.num_target = num_context, num_target
        self.min_points, self._max_context, self.max_total = min_points, max_context, max_total
        self.x_range, self.length_range, self.scale_range = x_range, length_range, scale_range
        self.noise_std = noise_std

    @property
    def max_context(self) -> int:
        return self._max_context if self.num_context is None else self.num_context

    def sample_hyperparameters(self, batch_size: int, generator: torch.Generator
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task ``(length, scale)``, each ``[batch_size]``, uniform on their ranges."""
        u = torch.rand(2, batch_size, generator=generator)  # [2, B]
        (l_lo, l_hi), (s_lo, s_hi) = self.length_range, self.scale_range
        return l_lo + (l_hi - l_lo) * u[0], s_lo + (s_hi - s_lo) * u[1]

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu",
               split: str = "train") -> Batch:
        if batch_size <= 0:
            raise ValueError(f"gp task: batch_size must be positive; got {batch_size}")
        if split not in SPLITS:
            raise ValueError(f"gp task: unknown split {split!r}; known splits: {SPLITS}")
        n, m = context_target_sizes(generator, self.min_points, self._max_context, self.max_total,
                                    self.num_context, self.num_target)
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(batch_size, n + m, 1, generator=generator)  # [B, N+M, 1]
        length, scale = self.sample_hyperparameters(batch_size, generator)
        kernel = split if split in KERNELS else self.kernel
        y = sample_gp(x, length, scale, kernel, self.noise_std, generator)  # [B, N+M, 1]
        return Batch(xc=x[:, :n], yc=y[:, :n], xt=x[:, n:], yt=y[:, n:]).to(device)

    def figure_batch(self, generator: torch.Generator, device: torch.device | str = "cpu", num_tasks: int = 4,
                     grid: int = 200) -> Batch:
        """``num_tasks`` functions with ``max_context // 2`` random context points and ``grid`` targets
        evenly spaced over ``x_range`` (drawn jointly), so the plotted fit is a smooth curve."""
        n = max(self.min_points, self.max_context // 2)
        lo, hi = self.x_range
        xc = lo + (hi - lo) * torch.rand(num_tasks, n, 1, generator=generator)  # [B, N, 1]
        xt = torch.linspace(lo, hi, grid).expand(num_tasks, grid)[..., None]  # [B, G, 1]
        x = torch.cat([xc, xt], 1)  # [B, N+G, 1]
        length, scale = self.sample_hyperparameters(num_tasks, generator)
        y = sample_gp(x, length, scale, self.kernel, self.noise_std, generator)  # [B, N+G, 1]
        return Batch(xc=xc, yc=y[:, :n], xt=xt, yt=y[:, n:]).to(device)

    def figure(self, batch: Batch, out: torch.Tensor, head: Any) -> Figure:
        """:func:`plot_gp_fit` of the Normal head's mean and +/- 2 std (see :meth:`Task.figure`)."""
        mean, std = head.mean_std(out)
        return plot_gp_fit(batch.xc, batch.yc, batch.xt, batch.yt, mean, std)


def plot_gp_fit(xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, mean: torch.Tensor,
                std: torch.Tensor | None = None, max_plots: int = 4) -> Figure:
    """A figure of up to ``max_plots`` GP tasks: context, targets, predicted mean and a +/- 2 std band.

    Args:
        xc: ``[B, N, 1]``, yc: ``[B, N, 1]`` context; xt: ``[B, M, 1]``, yt: ``[B, M, 1]`` targets.
        mean: ``[B, M, 1]`` predicted mean at ``xt``; std: ``[B, M, 1]`` predicted std (optional).
        max_plots: number of tasks drawn, one panel each.

    Returns:
        A matplotlib ``Figure`` (Agg canvas, no pyplot state), e.g. for ``SummaryWriter.add_figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = min(max_plots, xc.shape[0])
    if k <= 0:
        raise ValueError("plot_gp_fit: need at least one task (B > 0, max_plots > 0)")
    fig = Figure(figsize=(4 * k, 3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, k, squeeze=False)[0]
    for i, ax in enumerate(axes):
        order = xt[i, :, 0].argsort()
        x_t = xt[i, order, 0].detach().cpu().numpy()
        mu = mean[i, order, 0].detach().cpu().numpy()
        ax.plot(x_t, mu, color="C0", label="mean")
        if std is not None:
            sd = std[i, order, 0].detach().cpu().numpy()
            ax.fill_between(x_t, mu - 2 * sd, mu + 2 * sd, color="C0", alpha=0.25, label="+/- 2 std")
        ax.scatter(x_t, yt[i, order, 0].detach().cpu().numpy(), s=12, color="C1", label="target")
        ax.scatter(xc[i, :, 0].detach().cpu().numpy(), yc[i, :, 0].detach().cpu().numpy(), s=16, color="k",
                   marker="x", label="context")
    axes[0].legend(fontsize="small")
    return fig
