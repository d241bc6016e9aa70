"""Training configuration: one dataclass whose fields carry their own help, plus per-task presets.

Precedence: command-line flag > preset (``--preset cpu|paper``) > dataclass default. Model fields left
at ``None`` fall back to the task's defaults (ordering, reward) and the paper's (``ModelConfig``).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from agents import AGENT_NAMES
from tca_env.checkpoint import TASK_OPTION_FIELDS
from tca_env.model import BASELINES, DECODERS, ENCODERS, ModelConfig
from tca_env.tasks import ORDERINGS, REWARDS, TASKS, Task, make_task
from tca_env.tasks.copy import CopyTask

#: --agent choices: the fused paper step, or an agent acting through the env (agents.sb3.make_agent's names)
AGENTS = ("fused", *AGENT_NAMES)


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # --- task
    task: str = opt("copy", f"Task to train on: {', '.join(TASKS)}, or your own as "
                    "package.module:ClassName (a tca_env.tasks.Task subclass or factory).")
    task_args: str | None = opt(None, "JSON object of task constructor arguments, for any task (e.g. your own): "
                                "'{\"n\": 10}'. The named task flags below take precedence.")
    seq_len: int | None = opt(None, "Copy task: sequence length L; the tree holds L/2 tokens, L/2 queries.")
    query_positions: str | None = opt(None, "Copy task: query positions L/2..L-1 after the context (after, the "
                                      "default) or 0..L/2-1 of their own (own, as the reference code).",
                                      CopyTask.QUERY_POSITIONS)
    context_len: int | None = opt(None, "Recall task: context pairs N per set (the largest N with a "
                                  "min_context_len in --task-args).")
    min_context_len: int | None = opt(None, "Recall task: smallest N; each batch then draws N log-uniformly in "
                                      "[min_context_len, context_len].")
    min_key_scale: float | None = opt(None, "Recall task, training sets only: each set's keys fill a random box "
                                      "of side log-uniform in [min_key_scale, 1] (zoom), so small N also shows "
                                      "the key spacings of far larger contexts; evaluation keeps the unit cube.")
    kernel: str | None = opt(None, "GP task: training kernel (rbf or matern52).")
    source: str | None = opt(None, "Data source of the images / activity tasks (e.g. synthetic: no data package).")
    # --- model (None: task / paper default)
    decoder: str = opt("tca", "Read-out: tca (tree search), ca (full cross attention), perceiver (latents).",
                       DECODERS)
    d_model: int | None = opt(None, "Model width D (paper: 64).")
    nhead: int | None = opt(None, "Attention heads (paper: 4).")
    dim_ff: int | None = opt(None, "Feed-forward width (paper: 128).")
    emb_depth: int | None = opt(None, "Layers of the embedding MLPs (paper: 4).")
    fourier_octaves: int | None = opt(None, "Fourier features of the inputs, octaves 2^0..2^(F-1) (0: off, the "
                                      "paper's model; the recall task's default: 8).")
    encoder: str | None = opt(None, "Context encoder: quadratic (Transformer) or constant (none).",
                              ENCODERS)
    enc_layers: int | None = opt(None, "Transformer encoder layers (paper: 6).")
    dropout: float | None = opt(None, "Dropout of attention weights, feed-forward outputs and the position encoding.")
    policy_dropout: bool | None = opt(None, "Also drop the search policy's per-head probabilities, as the reference "
                                      "code samples (default: no).")
    policy_p: float | None = opt(None, "Rate of that policy dropout (default: --dropout). With --dropout 0 it keeps "
                                 "the noisy sampling without attention dropout, which on a CPU slows full "
                                 "attention about 3x.")
    branch: int | None = opt(None, "Tree branch factor b (paper: 2).")
    ordering: str | None = opt(None, "Tree ordering: natural, coord, projection or kd (task default).",
                               ORDERINGS)
    bptt: bool | None = opt(None, "Backpropagate through the tree aggregator into the encoder.")
    num_latents: int | None = opt(None, "Perceiver IO latents (default |S|: equal tokens with tca).")
    lambda_ca: float | None = opt(None, "Weight of L_CA, the full cross-attention auxiliary loss (paper: 1).")
    lambda_rl: float | None = opt(None, "Weight of L_RL, the REINFORCE loss of the search (paper: 1).")
    reward: str | None = opt(None, "RL reward: acc, nce, ll or mse (task default).", REWARDS)
    rl_baseline: str | None = opt(None, "REINFORCE baseline: none, batch_mean or ema.",
                                  BASELINES)
    entropy_coef: float | None = opt(None, "Entropy bonus of the search policy (paper: 0.01).")
    # --- search agent
    agent: str = opt("fused", "Search agent: fused (the paper's step: the read-out's attention trained by REINFORCE "
                     "in the predictor's own backward pass), reinforce (the same policy acting through the env), "
                     "ppo, a2c, dqn, maskable_ppo (Stable-Baselines3 / sb3-contrib on the env), or random (the floor).",
                     AGENTS)
    agent_lr: float | None = opt(None, "Learning rate of an external agent (default: the algorithm's own).")
    agent_options: str | None = opt(None, "JSON object of extra agent constructor arguments, e.g. "
                                    "'{\"n_epochs\": 8}' for ppo (see agents.sb3.make_agent).")
    # --- optimisation
    steps: int = opt(2000, "Training steps (batches).")
    batch_size: int = opt(16, "Context sets per batch (each with its M queries).")
    lr: float = opt(5e-4, "Adam learning rate (cosine-decayed to 0 over --lr-horizon steps).")
    lr_horizon: int | None = opt(None, "Steps of the cosine decay (default: --steps). The reference copy script "
                                 "decays over 100,000 steps, so a shorter run keeps the rate near 5e-4.")
    beta1: float = opt(0.9, "Adam beta1 (the copy task's reference script uses 0.1).")
    beta2: float = opt(0.999, "Adam beta2.")
    clip: float = opt(1.0, "Gradient-norm clipping threshold.")
    # --- evaluation, logging, checkpoints
    eval_every: int = opt(500, "Greedy evaluation every this many steps (0: only at the end).")
    eval_size: int = opt(1000, "Tasks (e.g. sequences) in the fixed held-out evaluation set.")
    eval_batch: int = opt(100, "Batch size for evaluation.")
    eval_seed: int = opt(10_000, "Seed of the evaluation set (fixed across runs).")
    log_every: int = opt(25, "TensorBoard scalars every this many steps.")
    ckpt_every: int = opt(1000, "Checkpoint every this many steps (0: only at the end).")
    run_dir: str | None = opt(None, "Directory for TensorBoard events, checkpoints and the final report "
                              "(default: runs/<task>-<decoder>-<agent>[-<preset>]).")
    resume: bool = opt(False, "Resume from run_dir/checkpoint.pt if it exists (the run's configuration must match).")
    init_from: str | None = opt(None, "Start from the model weights of this checkpoint (fine-tuning, or a curriculum "
                                "such as copy at L = 256 before L = 1,024); the optimiser, rate schedule, step count "
                                "and data start afresh. The model config must match it apart from the task's size "
                                "(max_context), dropout, the loss settings and the number of heads (the same "
                                "projection weights, split into --nhead heads). A resumed run continues from its own "
                                "checkpoint instead.")
    overwrite: bool = opt(False, "Replace the run in run_dir (its checkpoint, events and report) instead of "
                          "refusing to write there.")
    seed: int = opt(0, "Seed of parameters, training batches and sampled searches.")
    device: str = opt("cpu", "Torch device (cpu, cuda, cuda:1, mps, ...).")
    backend: str | None = opt(None, "How the model runs: torch (eager) or compile (torch.compile, one graph for "
                              "the training forward and one for greedy inference; pays for fixed-size batches). "
                              "Default: $TCA_BACKEND, else torch.", ("torch", "compile"))
    matmul: str | None = opt(None, "Route of large float32 matrix products on a CPU: auto (oneDNN where a probe at "
                             "start finds it exact and faster than the BLAS, e.g. 2.2x on AMD EPYC), onednn (always; "
                             "may round to bfloat16 on CPUs with AMX) or default (the BLAS). Default: $TCA_MATMUL, "
                             "else auto.", ("auto", "onednn", "default"))
    threads: int = opt(1, "torch.set_num_threads for CPU training (1 is fastest for these small ops).")
    progress: bool = opt(True, "Show a progress bar.")

    def task_options(self) -> dict[str, Any]:
        out: dict[str, Any] = _json_object(self.task_args, "--task-args")
        out.update({k: getattr(self, k) for k in TASK_OPTION_FIELDS if getattr(self, k) is not None})
        return out

    def agent_kwargs(self) -> dict[str, Any]:
        """``--agent-options`` parsed: a JSON object of agent constructor arguments."""
        return _json_object(self.agent_options, "--agent-options")

    def make_task(self) -> Task:
        return make_task(self.task, **self.task_options())

    def model_config(self, task: Task) -> ModelConfig:
        model_fields = {f.name for f in fields(ModelConfig)}
        overrides = {k: v for k, v in asdict(self).items() if k in model_fields and v is not None}
        return ModelConfig.for_task(task, **overrides)

    def default_run_dir(self, preset: str | None = None) -> str:
        return f"runs/{self.task}-{self.decoder}-{self.agent}" + (f"-{preset}" if preset else "")

    def validate(self) -> TrainConfig:
        if self.run_dir is None:
            self.run_dir = self.default_run_dir()
        if self.lr_horizon is not None and self.lr_horizon < self.steps:
            raise ValueError(f"--lr-horizon ({self.lr_horizon}) must be at least --steps ({self.steps})")
        for name in ("steps", "batch_size", "eval_size", "eval_batch", "log_every", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive; got {self.lr}")
        if self.agent != "fused" and self.decoder != "tca":
            raise ValueError(f"--agent {self.agent} searches a tree: it needs --decoder tca, not {self.decoder}")
        self.agent_kwargs()  # a malformed --agent-options or --task-args fails here, before any training
        self.task_options()
        return self


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    """A flag's JSON object (``{}`` when unset); anything else is an error naming the flag."""
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{flag} must be a JSON object; got {text!r}")
    return out


def _cpu_preset(task: str, steps: int, eval_size: int = 1000, eval_batch: int = 16) -> dict[str, Any]:
    """The "cpu" preset of the encoder tasks: a 2-layer encoder, batch 16, evaluation and a checkpoint
    halfway and at the end."""
    return dict(enc_layers=2, steps=steps, batch_size=16, eval_every=steps // 2, eval_size=eval_size,
                eval_batch=eval_batch, ckpt_every=steps // 2)


# Presets per task. "cpu": what we ship and measured on a 2-core CPU; "paper": the paper's protocol.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "copy": {
        # The reference copy script: no encoder, dropout 0.1 (attention weights, feed-forward, position
        # encoding, and the search policy's sampled weights), queries at positions 0..L/2-1 of their own,
        # Adam betas (0.1, 0.999), cosine decay over 100,000 steps, batch 128.
        # Quick start: L = 64 (32 context tokens), no dropout: > 99% in a few CPU minutes (with dropout 0.1,
        # 1,500 x 16 gave 27% against 78% without).
        "quick": dict(seq_len=64, encoder="constant", dropout=0.0, beta1=0.1, steps=2500, batch_size=16,
                      eval_every=500),
        # L = 256: the reference's setting at batch 16. Its noisy policy sampling is what keeps the search
        # from collapsing onto wrong subtrees (98.8% at 8,000 steps with it, 91.9% without).
        "cpu": dict(seq_len=256, encoder="constant", dropout=0.1, policy_dropout=True, query_positions="own",
                    beta1=0.1, steps=8000, lr_horizon=100_000, batch_size=16, eval_every=1000, ckpt_every=1000),
        "paper": dict(seq_len=256, encoder="constant", dropout=0.1, policy_dropout=True, query_positions="own",
                      beta1=0.1, steps=100_000, batch_size=128,
                      eval_every=5000),
    },
    # Associative recall, trained at N <= 1,024 for evaluation up to N = 2^20 (benchmarks/scale.py): N drawn
    # log-uniformly from 8 (small sets teach the read-out to match keys before the search has to route), 256
    # queries per set, the -CE reward with a batch-mean baseline (denser than accuracy: 46% held-out at 2,000
    # steps of N <= 256 against 28% with the accuracy reward), the rate held near 5e-4 as in the copy preset.
    # Measured at N = 1,024: with 256 queries per set the first level was routed right 97% of the time at step
    # 2,500, against 79% at step 1,750 with 64 queries and N up to 4,096 (more REINFORCE samples per tree).
    "recall": {
        "cpu": dict(context_len=1024, min_context_len=8, task_args='{"num_queries": 256}', reward="nce",
                    rl_baseline="batch_mean", steps=20_000, lr_horizon=100_000, batch_size=16, eval_every=1000,
                    eval_size=256, eval_batch=16, ckpt_every=250),
    },
    # The meta-learning and activity tasks keep the paper's model (D = 64, 4 heads, feed-forward 128) and
    # its Transformer encoder; "cpu" cuts the encoder from 6 layers to 2 and trains a few thousand steps, so
    # that one run takes a few minutes on one CPU thread (benchmarks/reproduce.py runs the grid).
    # Evaluation batches of 16 follow the paper's GP protocol (one N per batch, 3,000 batches of 16).
    "gp": {
        "cpu": _cpu_preset("gp", 4000, eval_size=3000),
        "paper": dict(enc_layers=6, steps=100_000, batch_size=16, eval_every=10_000, eval_size=48_000,
                      eval_batch=16, ckpt_every=5000),
    },
    # The paper gives no image budget; "paper" is our reading of the TNP protocol the paper builds on (200
    # epochs at batch 100), as steps on EMNIST's 24,000 training digits (48,000) and CelebA's 162,770 faces.
    "mnist": {
        "cpu": _cpu_preset("mnist", 2000),
        "paper": dict(enc_layers=6, steps=48_000, batch_size=100, eval_every=5000, eval_size=5000, eval_batch=100,
                      ckpt_every=5000),
    },
    "faces": {
        "cpu": _cpu_preset("faces", 2000),
        "paper": dict(enc_layers=6, steps=325_540, batch_size=100, eval_every=20_000, eval_size=5000,
                      eval_batch=100, ckpt_every=5000),
    },
    # The paper gives no activity budget either; "paper" reuses the GP budget with the paper's model.
    "activity": {
        "cpu": _cpu_preset("activity", 3000, eval_batch=100),
        "paper": dict(enc_layers=6, steps=100_000, batch_size=16, eval_every=10_000, eval_size=5000,
                      eval_batch=100, ckpt_every=5000),
    },
}


def default_for(name: str) -> Any:
    f = {f.name: f for f in fields(TrainConfig)}[name]
    return f.default if f.default is not MISSING else None


def build_config(preset: str | None = None, **flags: Any) -> TrainConfig:
    """Dataclass defaults, then the preset of ``flags['task']``, then the explicit flags."""
    task = flags.get("task") or default_for("task")
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS.get(task, {}):
            raise ValueError(f"no preset {preset!r} for task {task!r}; presets: {sorted(PRESETS.get(task, {}))}")
        values.update(PRESETS[task][preset])
    values.update({k: v for k, v in flags.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    cfg = TrainConfig(**values)
    if cfg.run_dir is None:
        cfg.run_dir = cfg.default_run_dir(preset)
    return cfg.validate()
