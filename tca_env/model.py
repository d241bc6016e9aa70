"""ReTreever: embedders, encoder, tree, read-outs (TCA, full cross attention, Perceiver IO), heads, losses.

The read-out attention module (:class:`ReadOut`) is shared by the search policy (its keys score the
children), the TCA read-out over the retrieved set S, and the full cross attention of L_CA and of the
"ca" decoder, as in the paper. Keys and values of every tree node are projected once per tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import backend
from . import search as S
from .layers import Attention, EncoderLayer, FeedForward, embedder, position_mlp
from .tasks.base import HEADS, ORDERINGS, REWARDS, Batch, Task
from .tree import Aggregator, Tree, TreeShape, build_tree, order_tokens, retrieved_size, take_rows

DECODERS = ("tca", "ca", "perceiver")
ENCODERS = ("quadratic", "constant")
BASELINES = S.BASELINES
STD_FORMS = ("exp", "bounded")


@dataclass
class ModelConfig:
    """ReTreever hyper-parameters (defaults: the paper's)."""

    x_dim: int = 1
    """Dimension of context / query inputs x."""
    y_dim: int = 0
    """Dimension of context values y (0: the context is x alone, as in sequence tasks)."""
    out_dim: int = 1
    """Number of classes (head "class") or target dimension."""
    head: str = "class"
    """Output head: "class" (logits), "reg" (mean, MSE loss) or "normal" (mean and std, NLL loss)."""
    sequential: bool = False
    """Add sinusoidal position encodings to context and query embeddings."""
    max_context: int = 128
    """Largest context size; sets Perceiver IO's default number of latents (|S| at this size)."""
    d_model: int = 64
    nhead: int = 4
    dim_ff: int = 128
    emb_depth: int = 4
    """Layers of the context and query embedding MLPs."""
    fourier_octaves: int = 0
    """Map each input coordinate x to ``[x, sin(2^j pi x), cos(2^j pi x)]`` for j < fourier_octaves before the
    embedders (0: off, the paper's model). Not in the paper: a standard input mapping for low-dimensional
    coordinates (NeRF's positional encoding), which lets the recall task resolve keys 1/2^j apart."""
    encoder: str = "quadratic"
    """"quadratic": a Transformer encoder over the context (layers.EncoderLayer); "constant": no encoder."""
    enc_layers: int = 6
    dropout: float = 0.0
    """Dropout of the attention weights, the feed-forward outputs and the position encoding (encoder,
    aggregator and read-out, as the reference applies it). The search policy's probabilities never get it."""
    policy_dropout: bool = False
    """Also drop the search policy's per-head probabilities (``dropout``), as the reference implementation
    samples (off by default: see search.step)."""
    policy_p: float | None = None
    """Rate of that policy dropout (None: ``dropout``, as the reference). A separate rate lets a run keep the
    reference's noisy sampling while turning dropout off elsewhere, where on a CPU it costs most: attention
    dropout makes torch's fused attention fall back to its materialised path (3.3x slower at L = 1,024)."""
    agg_dropout: float | None = None
    """Dropout inside the tree aggregator (None: ``dropout``, as the reference)."""
    decoder: str = "tca"
    """Read-out: "tca" (tree search + attention over S), "ca" (all tokens), "perceiver" (latents)."""
    branch: int = 2
    ordering: str = "natural"
    """Tree ordering: "natural", "coord" (sort by x[coord]), "projection" or "kd"."""
    coord: int = 0
    bptt: bool = False
    """Backpropagate through the aggregator into the encoder (the paper's default: no)."""
    num_latents: int | None = None
    """Perceiver IO latents; None = |S| at max_context (equal tokens with TCA)."""
    lambda_ca: float = 1.0
    lambda_rl: float = 1.0
    reward: str = "acc"
    """RL reward: "acc" (1[correct]), "nce" (-CE, baseline -log C), "ll" (log-likelihood), "mse" (-MSE)."""
    rl_baseline: str = "none"
    """Extra REINFORCE baseline: "none", "batch_mean" or "ema" (moving average of the reward)."""
    entropy_coef: float = 0.01
    std_form: str = "exp"
    """Normal head's standard deviation from its raw output: "exp" (exp(raw), the reference's GP head) or
    "bounded" (0.05 + 0.95 softplus(raw), the reference's image head)."""

    def validate(self) -> ModelConfig:
        checks = [("decoder", DECODERS), ("encoder", ENCODERS), ("head", HEADS), ("ordering", ORDERINGS),
                  ("reward", REWARDS), ("rl_baseline", BASELINES), ("std_form", STD_FORMS)]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {allowed}")
        if self.branch < 2:
            raise ValueError(f"branch factor must be >= 2; got {self.branch}")
        for name in ("dropout", "agg_dropout", "policy_p"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {v}")
        if self.fourier_octaves < 0:
            raise ValueError(f"fourier_octaves must be >= 0; got {self.fourier_octaves}")
        if self.d_model % self.nhead:
            raise ValueError(f"d_model {self.d_model} is not divisible by nhead {self.nhead}")
        if self.head == "class" and self.reward in ("ll", "mse"):
            raise ValueError(f"reward {self.reward!r} needs a regression head; head is 'class'")
        if self.head != "class" and self.reward in ("acc", "nce"):
            raise ValueError(f"reward {self.reward!r} needs a classification head; head is {self.head!r}")
        return self

    @classmethod
    def for_task(cls, task: Task, **overrides) -> ModelConfig:
        base = dict(x_dim=task.x_dim, y_dim=task.y_dim, out_dim=task.out_dim, head=task.head,
                    sequential=task.sequential, max_context=task.max_context, ordering=task.ordering,
                    reward=task.reward, std_form=task.std_form, **task.model_defaults)
        base.update(overrides)
        return cls(**base).validate()


def sinusoidal(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer position encoding: ``pos [...]`` -> ``[..., dim]``."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32).unsqueeze(-1) * freq  # [..., half]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class ReadOut(nn.Module):
    """The paper's one cross-attention module: the search policy's scores, the read-out over S, and full
    cross attention (L_CA and the "ca" decoder) all use it.

    ``a = Attn(LN(q), keys = values = the raw node or token embeddings) + LN(q)``, then
    ``z = a + q`` when ``query_residual`` (the TCA read-out's second residual, of the raw query embedding)
    or ``z = a`` (the CA decoder), and ``out = FF(LN(z)) + LN(z)``. :meth:`queries` / :meth:`keys_values`
    expose the projections so the tree's nodes are projected once and the search scores children with
    the same weights.
    """

    def __init__(self, d: int, nhead: int, dim_ff: int, dropout: float = 0.0, query_residual: bool = True):
        super().__init__()
        self.query_residual = query_residual
        self.norm_q, self.norm_out = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, nhead, dropout)
        self.ff = FeedForward(d, dim_ff, dropout)

    @property
    def nhead(self) -> int:
        return self.attn.nhead

    @property
    def dh(self) -> int:
        return self.attn.dh

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Raw query embeddings ``[..., D]`` -> ``[..., H, dh]``, pre-scaled so scores are plain dot products."""
        return self.attn.queries(self.norm_q(x))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalised) node or token embeddings ``[..., D]`` -> keys and values ``[..., H, dh]``."""
        return self.attn.keys_values(x)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residuals + feed-forward after attention: ``x [.., D]`` raw queries, ``attn [.., H, dh]`` -> ``[.., D]``."""
        h = self.norm_q(x)
        z = self.attn.out(attn.flatten(-2)) + h
        if self.query_residual:
            z = z + x
        z = self.norm_out(z)
        return self.ff(z) + z

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.keys_values(context)
        return self.finish(x, Attention.attend(self.queries(x), k, v, dropout=self.attn.p_drop))


class Head(nn.Module):
    """Maps read-out features to predictions and scores them (loss, metric, reward per query)."""

    def __init__(self, d: int, kind: str, out_dim: int, std_form: str = "exp"):
        super().__init__()
        self.kind, self.out_dim, self.std_form = kind, out_dim, std_form
        width = 2 * out_dim if kind == "normal" else out_dim
        self.net = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)

    def mean_std(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = out.chunk(2, dim=-1)
        return mean, raw.exp() if self.std_form == "exp" else 0.05 + 0.95 * F.softplus(raw)

    def point(self, out: torch.Tensor) -> torch.Tensor:
        """Point prediction: class index ``[B, M]`` or mean ``[B, M, dy]``."""
        if self.kind == "class":
            return out.argmax(-1)
        return self.mean_std(out)[0] if self.kind == "normal" else out

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-query task loss ``[B, M]``: cross entropy, Normal NLL (summed over dims) or MSE."""
        if self.kind == "class":
            return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        if self.kind == "normal":
            return -self.log_likelihood(out, y)
        return (out - y).pow(2).mean(-1)

    def log_likelihood(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean_std(out)
        return torch.distributions.Normal(mean, std).log_prob(y).sum(-1)

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-query metric ``[B, M]``: accuracy (class), log-likelihood (normal), -MSE (reg)."""
        if self.kind == "class":
            return (out.argmax(-1) == y).float()
        if self.kind == "normal":
            return self.log_likelihood(out, y)
        return -(out - y).pow(2).mean(-1)

    def reward(self, out: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
        """Per-query RL reward ``[B, M]`` (no gradient). "nce" is -CE minus its baseline -log C."""
        out = out.detach()
        if kind == "acc":
            return (out.argmax(-1) == y).float()
        if kind == "nce":
            return math.log(self.out_dim) - self.loss(out, y)
        if kind == "ll":
            return self.log_likelihood(out, y)
        if kind == "mse":
            point = self.point(out)
            return -(point - y).pow(2).mean(-1)
        raise ValueError(f"unknown reward {kind!r}; choose one of {REWARDS}")


@dataclass
class Context:
    """What a batch of trees offers its queries: everything the search and the read-out need."""

    batch: Batch
    enc: torch.Tensor | None  # [B, N, D] context encodings (None once dropped by a lean prepare)
    query_emb: torch.Tensor | None  # [B, M, D]
    q: torch.Tensor | None  # [B, M, H, dh] read-out queries (pre-scaled)
    tree: Tree | None = None
    kv: S.TreeKV | None = None
    enc_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, N, H, dh] each, for full attention


@dataclass
class Output:
    """A forward pass: predictions, per-query losses/metrics and, for TCA, the search."""

    out: torch.Tensor  # [B, M, out] raw head output from the decoder (S for tca)
    loss: torch.Tensor  # scalar total loss
    terms: dict[str, torch.Tensor]  # scalar loss terms and statistics (detached)
    metric: torch.Tensor  # [B, M]
    descent: S.Descent | None = None
    out_ca: torch.Tensor | None = None


class ReTreever(nn.Module):
    """The ReTreever model of the TCA paper: embedders, encoder, tree, read-out and head.

    The layers follow the paper's reference implementation (see :mod:`tca_env.layers` and
    :class:`ReadOut`); the "ca" and "perceiver" baselines share everything but the read-out.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        d = cfg.d_model
        x_in = cfg.x_dim * (1 + 2 * cfg.fourier_octaves)
        self.ctx_embed = embedder(x_in + cfg.y_dim, d, cfg.emb_depth)
        self.query_embed = embedder(x_in, d, cfg.emb_depth)
        if cfg.sequential:  # embedder -> position encoding (with dropout) -> MLP, for context and queries
            self.ctx_pos_mlp, self.query_pos_mlp = position_mlp(d), position_mlp(d)
            self.pos_drop = nn.Dropout(cfg.dropout)
        enc_layers = cfg.enc_layers if cfg.encoder == "quadratic" else 0
        self.encoder = nn.ModuleList(EncoderLayer(d, cfg.nhead, cfg.dim_ff, cfg.dropout) for _ in range(enc_layers))
        # The TCA read-out adds a second residual of the raw query (so does its L_CA); the CA decoder does not.
        self.readout = ReadOut(d, cfg.nhead, cfg.dim_ff, cfg.dropout, query_residual=cfg.decoder == "tca")
        self.head = Head(d, cfg.head, cfg.out_dim, cfg.std_form)
        if cfg.decoder == "tca":
            agg_drop = cfg.dropout if cfg.agg_dropout is None else cfg.agg_dropout
            self.aggregator = Aggregator(d, cfg.nhead, cfg.dim_ff, agg_drop)
        if cfg.decoder == "perceiver":
            self.latents = nn.Parameter(torch.randn(self.num_latents, d) * 0.02)
            self.latent_attn = ReadOut(d, cfg.nhead, cfg.dim_ff, cfg.dropout, query_residual=False)
        self.register_buffer("reward_ema", torch.zeros(()))

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents or retrieved_size(self.cfg.max_context, self.cfg.branch)

    def tree_shape(self, n: int) -> TreeShape:
        return TreeShape(n, self.cfg.branch)

    # ------------------------------------------------------------------ embedding and tree building

    def _check(self, batch: Batch) -> None:
        if torch.compiler.is_compiling():  # the backend's dispatch validated the batch eagerly, before the graph
            return
        batch.validate()
        c = self.cfg
        if batch.xc.shape[-1] != c.x_dim or batch.xt.shape[-1] != c.x_dim:
            raise ValueError(f"model expects x_dim = {c.x_dim}; batch has xc {batch.xc.shape[-1]}, "
                             f"xt {batch.xt.shape[-1]}")
        ydim = 0 if batch.yc is None else batch.yc.shape[-1]
        if ydim != c.y_dim:
            raise ValueError(f"model expects context values of dim {c.y_dim}; batch has {ydim}")
        if c.sequential and (batch.pc is None or batch.pt is None):
            raise ValueError("a sequential model needs token positions batch.pc and batch.pt")
        if c.head == "class" and batch.yt.dtype != torch.long:
            raise ValueError(f"classification targets must be long class indices; got {batch.yt.dtype}")

    def input_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dx]`` -> ``[..., dx * (1 + 2F)]``: x and its Fourier features (``cfg.fourier_octaves`` = F)."""
        F_ = self.cfg.fourier_octaves
        if F_ == 0:
            return x
        freq = math.pi * 2.0 ** torch.arange(F_, device=x.device, dtype=x.dtype)  # [F]
        ang = (x.unsqueeze(-1) * freq).flatten(-2)  # [..., dx * F]
        return torch.cat([x, ang.sin(), ang.cos()], -1)

    def encode_context(self, batch: Batch, check: bool = True, chunk: int | None = None) -> torch.Tensor:
        """Context encodings ``[B, N, D]`` (``check=False``: the batch was validated already).

        ``chunk``: without autograd and without a context encoder, embed at most this many tokens at a time
        into the output (the embedder's temporaries stay O(chunk * D) rather than O(N * D)).
        """
        if check:
            self._check(batch)
        if chunk is not None and not torch.is_grad_enabled() and not len(self.encoder):
            B, N = batch.xc.shape[:2]
            rows = max(1, chunk // B)
            if rows < N:
                out = batch.xc.new_empty(B, N, self.cfg.d_model)
                for i in range(0, N, rows):
                    part = Batch(batch.xc[:, i:i + rows], None if batch.yc is None else batch.yc[:, i:i + rows],
                                 batch.xt, batch.yt, None if batch.pc is None else batch.pc[..., i:i + rows])
                    out[:, i:i + rows] = self.encode_context(part, check=False)
                return out
        x = self.input_features(batch.xc)
        x = x if batch.yc is None else torch.cat([x, batch.yc], -1)
        h = self.ctx_embed(x)  # [B, N, D]
        if self.cfg.sequential:
            h = self.ctx_pos_mlp(self.pos_drop(h + sinusoidal(batch.pc, self.cfg.d_model)))
        for layer in self.encoder:
            h = layer(h)
        return h

    def embed_queries(self, batch: Batch) -> torch.Tensor:
        """Query embeddings ``[B, M, D]``."""
        return self.embed_query_inputs(batch.xt, batch.pt)

    def embed_query_inputs(self, xt: torch.Tensor, pt: torch.Tensor | None = None) -> torch.Tensor:
        """Query embeddings ``[B, M, D]`` of query inputs ``xt [B, M, dx]`` (positions ``pt [M]``: sequential)."""
        qe = self.query_embed(self.input_features(xt))  # [B, M, D]
        if self.cfg.sequential:
            if pt is None:
                raise ValueError("a sequential model needs query positions pt")
            qe = self.query_pos_mlp(self.pos_drop(qe + sinusoidal(pt, self.cfg.d_model)))
        return qe

    #: rows per embedding / aggregation / projection call of a build without autograd, for contexts of more
    #: than :attr:`build_unchunked_max` tokens in all: bounds its temporaries at large N, and at 4,096 rows they
    #: stay in cache (the build at 2^20 is 1.5x faster than in chunks of 65,536). Smaller builds take one call
    #: per level (as fast at B x N = 4 x 4,096, and fewer ops).
    build_chunk = 4096
    build_unchunked_max = 16384

    def build(self, batch: Batch, full: bool | None = None, lean: bool = False, chunk: int | None = None) -> Context:
        """The context side of :meth:`prepare`: embed, encode and (TCA) build the tree with every node's keys
        and values projected once. The result serves any number of query batches (:meth:`query`).

        Args:
            full: also project the N encodings for full cross attention (needed by L_CA and "ca";
                default: when the decoder is "ca" or the model is training with lambda_CA > 0).
            lean: drop the encodings and the tree's embeddings once their keys and values exist (greedy
                inference keeps only what the search and read-out use). Without a context encoder a lean build
                orders the raw inputs first and embeds them in the tree's order (the same values).
            chunk: bound the build's temporaries to about this many rows (embedding, aggregation and projections,
                without autograd); None: :attr:`build_chunk` without autograd above :attr:`build_unchunked_max`
                tokens, else one call per level. Values do not change.
        """
        self._check(batch)
        with backend.matmul_scope(batch.xc.shape[:2].numel()):
            return self._build(batch, full, lean, chunk)

    def _build(self, batch: Batch, full: bool | None, lean: bool, chunk: int | None) -> Context:
        c = self.cfg
        if full is None:
            full = c.decoder == "ca" or (c.decoder == "tca" and self.training and c.lambda_ca > 0)
        if chunk is None and not torch.is_grad_enabled() and batch.xc.shape[:2].numel() > self.build_unchunked_max:
            chunk = self.build_chunk
        keep_enc = full or not lean or c.decoder == "perceiver"  # Perceiver IO's latents attend to the encodings
        ctx = Context(batch, None, None, None)
        if keep_enc:
            ctx.enc = self.encode_context(batch, check=False, chunk=chunk)
            if full:
                ctx.enc_kv = self.readout.keys_values(ctx.enc)  # [B, N, H, dh] x2
        if c.decoder == "tca":
            perm, inputs = None, batch
            if not keep_enc and not len(self.encoder) and c.ordering != "natural" and batch.pc is None:
                # Lean, and each token embedded on its own: order the raw inputs and embed them in the tree's
                # order, rather than move N x D encodings (at 2^20 tokens, 56 MB of inputs instead of 256 MB).
                perm = order_tokens(batch.xc, batch.N, c.branch, c.ordering, c.coord)
                inputs = Batch(take_rows(batch.xc, perm), None if batch.yc is None else take_rows(batch.yc, perm),
                               batch.xt, batch.yt)
            # A lean build hands the tree the only reference to the encodings, so they are freed once the
            # tree's tokens hold them in slot order.
            ctx.tree = build_tree(ctx.enc if keep_enc else self.encode_context(inputs, check=False, chunk=chunk),
                                  c.branch, self.aggregator, c.ordering, batch.xc, c.coord, c.bptt, chunk, perm)
            del inputs
            tok_kv = self._slot_kv(ctx) if full else None
            ctx.kv = S.TreeKV.from_tree(ctx.tree, self.readout.keys_values, tok_kv, chunk)
            if lean:
                ctx.tree = None
        return ctx

    def _check_queries(self, ctx: Context, xt: torch.Tensor) -> None:
        if xt.dim() != 3 or xt.shape[0] != ctx.batch.B or xt.shape[-1] != self.cfg.x_dim:
            raise ValueError(f"queries must be [B, M, x_dim] = [{ctx.batch.B}, M, {self.cfg.x_dim}] for this "
                             f"context; got {tuple(xt.shape)}")

    def attach_queries(self, ctx: Context, xt: torch.Tensor, pt: torch.Tensor | None = None) -> Context:
        """``ctx`` with the queries ``xt [B, M, dx]`` embedded and projected (``ctx`` itself is not changed)."""
        if not torch.compiler.is_compiling():  # a compiled caller validated them eagerly, before the graph
            self._check_queries(ctx, xt)
        query_emb = self.embed_query_inputs(xt, pt)
        return replace(ctx, query_emb=query_emb, q=self.readout.queries(query_emb))

    def prepare(self, batch: Batch, full: bool | None = None, lean: bool = False, chunk: int | None = None) -> Context:
        """:meth:`build` the context, then embed the batch's queries (see :meth:`build` for the arguments).

        The tree is built before the queries are embedded so that the aggregation's temporaries and the
        queries are never in memory at the same time.
        """
        ctx = self.build(batch, full, lean, chunk)
        with backend.matmul_scope(batch.xt.shape[:2].numel()):
            return self.attach_queries(ctx, batch.xt, batch.pt)

    def _slot_kv(self, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Token keys/values moved into the tree's slot layout (reusing the full-attention projections)."""
        tree = ctx.tree
        B, N = tree.perm.shape
        if self.cfg.ordering == "natural" and N == tree.shape.num_slots:
            return ctx.enc_kv  # slots are the tokens in their own order: nothing to move
        slot = tree.shape.slot_index(tree.perm.device)
        out = []
        for t in ctx.enc_kv:
            padded = t.new_zeros(B, tree.shape.num_slots, *t.shape[2:])
            padded[:, slot] = t.gather(1, tree.perm.view(B, N, 1, 1).expand_as(t))
            out.append(padded)
        return out[0], out[1]

    # ---------------------------------------------------------------------------------- read-outs

    def predict_path(self, ctx: Context, path: torch.Tensor, descent: S.Descent | None = None) -> torch.Tensor:
        """Head output ``[B, M, out]`` from attending over the retrieved set of ``path [B, M, k+1]``."""
        attn = S.readout(ctx.kv, ctx.q, path, descent, self.readout.attn.p_drop)
        return self.head(self.readout.finish(ctx.query_emb, attn))

    def predict_full(self, ctx: Context) -> torch.Tensor:
        """Head output of full cross attention over all N context encodings (decoder "ca", and L_CA)."""
        k, v = ctx.enc_kv
        attn = Attention.attend(ctx.q, k, v, dropout=self.readout.attn.p_drop)
        return self.head(self.readout.finish(ctx.query_emb, attn))

    def predict_perceiver(self, ctx: Context) -> torch.Tensor:
        """Perceiver IO: L latents attend to the context, then the queries attend to the latents."""
        B = ctx.enc.shape[0]
        lat = self.latent_attn(self.latents.expand(B, -1, -1), ctx.enc)  # [B, L, D]
        k, v = self.readout.keys_values(lat)
        return self.finish_head(ctx.query_emb, Attention.attend(ctx.q, k, v, dropout=self.readout.attn.p_drop))

    # ------------------------------------------------------------------------------ forward + losses

    def forward(self, batch: Batch, search: str = "sample", actions: torch.Tensor | None = None,
                generator: torch.Generator | None = None, with_ca: bool | None = None) -> Output:
        """Predict and compute L = L_TCA + lambda_CA L_CA + lambda_RL L_RL (the plain task loss otherwise).

        Runs on the backend of :mod:`tca_env.backend` (eager or ``torch.compile``).

        Args:
            search: ``"sample"`` (training) or ``"greedy"`` (inference) descent for TCA.
            actions: ``[B, M, k]`` replay these children instead of choosing.
            generator: draws the sampled search's Gumbel noise (all levels at once, before the graph).
            with_ca: compute L_CA (default: in training mode when lambda_CA > 0).
        """
        if search not in S.SEARCH_MODES:
            raise ValueError(f"unknown search mode {search!r}; choose one of {S.SEARCH_MODES}")
        if with_ca is None:
            with_ca = self.training and self.cfg.lambda_ca > 0
        noise = None
        if self.cfg.decoder == "tca" and search == "sample" and actions is None:
            shape = self.tree_shape(batch.N)
            noise = S.gumbel_noise((shape.k, batch.B, batch.M, shape.b), batch.xt, generator)
        return self._dispatch("_forward", batch, search, actions, noise, with_ca)

    def _dispatch(self, name: str, batch: Batch, *args):
        if backend.backend() != "torch":
            self._check(batch)  # the compiled graph has no data-dependent branches: validate before it
        with backend.matmul_scope(batch.xc.shape[:2].numel()):
            return backend.call(self, name, batch, *args)

    def _forward(self, batch: Batch, search: str, actions: torch.Tensor | None, noise: torch.Tensor | None,
                 with_ca: bool) -> Output:
        c = self.cfg
        ctx = self.prepare(batch, full=c.decoder == "ca" or (c.decoder == "tca" and with_ca))
        if c.decoder == "ca":
            out = self.predict_full(ctx)
            return self._plain_output(out, batch)
        if c.decoder == "perceiver":
            return self._plain_output(self.predict_perceiver(ctx), batch)
        p_drop = self.readout.attn.p_drop
        attn, descent = S.search_readout(ctx.kv, ctx.q, search, actions, None, p_drop,
                                         (p_drop if c.policy_p is None else c.policy_p) if c.policy_dropout else 0.0,
                                         noise)
        out = self.head(self.readout.finish(ctx.query_emb, attn))
        out_ca = self.predict_full(ctx) if with_ca else None
        loss, terms = self.tca_loss(out, batch.yt, descent.log_prob, descent.entropy, out_ca)
        terms["tokens"] = torch.tensor(float(ctx.kv.shape.retrieved_size))
        terms["token_frac"] = terms["tokens"] / batch.N
        return Output(out, loss, terms, self.head.metric(out.detach(), batch.yt), descent, out_ca)

    def _plain_output(self, out: torch.Tensor, batch: Batch) -> Output:
        loss = self.head.loss(out, batch.yt).mean()
        n_tok = batch.N if self.cfg.decoder == "ca" else self.num_latents
        terms = {"loss": loss.detach(), "loss_task": loss.detach(), "tokens": torch.tensor(float(n_tok)),
                 "token_frac": torch.tensor(n_tok / batch.N)}
        return Output(out, loss, terms, self.head.metric(out.detach(), batch.yt))

    def advantage(self, reward: torch.Tensor) -> torch.Tensor:
        """Reward minus the configured baseline (the "ema" baseline moves in training mode)."""
        return S.advantage(reward, self.cfg.rl_baseline, self.reward_ema, update=self.training)

    def tca_loss(self, out: torch.Tensor, y: torch.Tensor, log_prob: torch.Tensor, ent: torch.Tensor,
                 out_ca: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The paper's loss from the S-prediction ``out``, the path log-probs and entropies ``[B, M]``."""
        c = self.cfg
        l_tca = self.head.loss(out, y).mean()
        reward = self.head.reward(out, y, c.reward)  # [B, M]
        l_rl = S.reinforce_loss(log_prob, ent, self.advantage(reward), c.entropy_coef)
        loss = l_tca + c.lambda_rl * l_rl
        terms = {"loss_tca": l_tca.detach(), "loss_rl": l_rl.detach(), "reward": reward.mean(),
                 "entropy": ent.detach().mean()}
        if out_ca is not None:
            l_ca = self.head.loss(out_ca, y).mean()
            loss = loss + c.lambda_ca * l_ca
            terms["loss_ca"] = l_ca.detach()
        terms["loss"] = loss.detach()
        return loss, terms

    @torch.no_grad()
    def predict(self, batch: Batch, chunk: int | None = None) -> torch.Tensor:
        """Greedy inference: head output ``[B, M, out]`` with the configured decoder (on the backend of
        :mod:`tca_env.backend`)."""
        return self._dispatch("_predict", batch, chunk)

    def _predict(self, batch: Batch, chunk: int | None) -> torch.Tensor:
        return self._answer(self.prepare(batch, lean=True, chunk=chunk))

    @torch.no_grad()
    def query(self, ctx: Context, xt: torch.Tensor, pt: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy inference of new queries ``xt [B, M, dx]`` on an already built context (:meth:`build`):
        build once, query many times. Equals :meth:`predict` on the batch with these queries.

        On the ``compile`` backend (:mod:`tca_env.backend`) the queries go through one compiled graph per chunk
        of about :data:`search.greedy_chunk` (the embedding, the search, the read-out and the head fused where
        inductor can: at 2^20 tokens on one CPU thread 0.67x eager's time per query with one head; with four
        1.05x on the oneDNN matmul route, 0.85x on the BLAS's). The chunks are cut here, outside the graph, so
        that a long batch of queries does not unroll into one huge graph; a new chunk size or context size compiles
        once more (3-26 s on one CPU thread here).
        """
        with backend.matmul_scope(xt.shape[:2].numel()):
            if backend.backend() == "torch":
                return self._query(ctx, xt, pt)
            return self._query_compiled(ctx, xt, pt)

    def _query_compiled(self, ctx: Context, xt: torch.Tensor, pt: torch.Tensor | None) -> torch.Tensor:
        self._check_queries(ctx, xt)
        # The graph never reads the context's batch (its queries are checked above): without it, a tree built from
        # another batch of the same size (other query counts, say) reuses the graph instead of compiling anew.
        ctx = replace(ctx, batch=None)
        cols = S.chunk_columns(xt.shape[0])
        # Chunks in fresh contiguous memory: a slice's strides depend on the whole batch's length (even along a
        # dim of size 1, where .contiguous() keeps them), and the graph is guarded on them.
        dense = torch.contiguous_format
        outs = [backend.call(self, "_query", ctx, xt[:, m0:m0 + cols].clone(memory_format=dense),
                             None if pt is None else pt[:, m0:m0 + cols].clone(memory_format=dense))
                for m0 in range(0, xt.shape[1], cols)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _query(self, ctx: Context, xt: torch.Tensor, pt: torch.Tensor | None) -> torch.Tensor:
        return self._answer(self.attach_queries(ctx, xt, pt), keep=True)

    def _answer(self, ctx: Context, keep: bool = False) -> torch.Tensor:
        """Greedy read-out and head for a prepared context; ``keep=False`` frees its keys and values as it goes."""
        c = self.cfg
        if c.decoder == "perceiver":
            return self.predict_perceiver(ctx)
        # Both read-outs free their keys and values before the feed-forward (a fair memory comparison).
        if c.decoder == "ca":
            attn = Attention.attend(ctx.q, *ctx.enc_kv)
        else:
            attn, _ = S.greedy_readout(ctx.kv, ctx.q)
        query_emb = ctx.query_emb
        if not keep:
            ctx.enc_kv = ctx.kv = ctx.q = None
        return self.finish_head(query_emb, attn)

    #: rows per chunk of :meth:`finish_head` without autograd
    finish_chunk_rows = 4096

    def finish_head(self, query_emb: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + feed-forward + head: ``[B, M, D]``, ``[B, M, H, dh]`` -> ``[B, M, out]``.

        Without autograd the rows go through in chunks of ``finish_chunk_rows``, so the feed-forward's
        temporaries (several ``[B, M, D]``-sized tensors) never exist for the whole batch; every decoder
        uses this (a fair memory comparison).
        """
        if torch.is_grad_enabled() or query_emb.numel() == 0:
            return self.head(self.readout.finish(query_emb, attn))
        lead = query_emb.shape[:-1]
        x, a = query_emb.reshape(-1, query_emb.shape[-1]), attn.reshape(-1, *attn.shape[-2:])
        out = None
        for r0 in range(0, x.shape[0], self.finish_chunk_rows):
            r1 = min(x.shape[0], r0 + self.finish_chunk_rows)
            o = self.head(self.readout.finish(x[r0:r1], a[r0:r1]))
            if out is None:
                out = o.new_empty(x.shape[0], o.shape[-1])
            out[r0:r1] = o
        return out.view(*lead, -1)
