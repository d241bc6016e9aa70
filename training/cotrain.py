"""The training loops: sample tasks, search the trees, update the predictor and the search policy.

Read it top to bottom: :meth:`Trainer.fit` runs :meth:`Trainer.run`; :meth:`Trainer.train_step` is the
paper's fused step, where the attention policy is the read-out's own attention, trained by REINFORCE
inside one forward/backward together with L_TCA and L_CA. :class:`CoTrainer` is the same loop with any
agent acting through the TreeRetrieval environment; ``make_trainer`` picks one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from agents.base import Rollout, play_episodes
from agents.sb3 import cotrain_agent, make_agent
from agents.sb3 import predict as sb3_predict
from tca_env import backend as model_backend
from tca_env.checkpoint import load_predictor
from tca_env.env import FinishedBatch
from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import Batch
from tca_env.tasks.base import summarize_metric
from tca_env.vector_env import TreeRetrievalVectorEnv

from . import checkpoint as ckpt_io
from . import distributed
from .config import TrainConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRIC_NAMES = {"class": "accuracy", "normal": "log_likelihood", "reg": "neg_mse"}


def make_writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import

    return SummaryWriter(log_dir=str(run_dir))


class _NoWriter:
    """What ranks other than 0 of a multi-process run log to: nothing (rank 0 writes the one TensorBoard run)."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_figure(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Trains a ReTreever (or its CA / Perceiver IO baselines) on one task."""

    def __init__(self, cfg: TrainConfig, load: bool = True):
        """``load=False``: a subclass resumes by itself once it has built what the checkpoint restores."""
        self.cfg = cfg.validate()
        if cfg.agent != "fused" and type(self) is Trainer:
            raise ValueError(f"--agent {cfg.agent} trains through the environment: use CoTrainer (make_trainer)")
        torch.set_num_threads(cfg.threads)
        if cfg.backend is not None:
            model_backend.set_backend(cfg.backend)
        if cfg.matmul is not None:
            model_backend.set_matmul(cfg.matmul)
        # Under torchrun: this process's rank among world_size data-parallel processes (training.distributed).
        self.rank, self.world_size, self.backend = distributed.setup(cfg.device)
        if self.world_size > 1:
            if cfg.agent not in ("fused", "reinforce", "random"):
                raise ValueError(f"--agent {cfg.agent} under torchrun: Stable-Baselines3 has no distributed "
                                 "training; run SB3 agents in one process (data-parallel: fused, reinforce, random)")
            if cfg.agent == "reinforce" and cfg.agent_kwargs().get("shared") is False:
                raise ValueError("a standalone REINFORCE policy (shared=false) trains with its own optimizer in one "
                                 "process; under torchrun use the shared policy (the default)")
            if cfg.batch_size % self.world_size:
                raise ValueError(f"--batch-size {cfg.batch_size} does not split over {self.world_size} processes; "
                                 "use a multiple of the process count")
        self.device = torch.device(distributed.local_device(cfg.device))
        self.task = cfg.make_task()
        torch.manual_seed(cfg.seed)
        self.model = ReTreever(self.model_config()).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.lr_horizon or cfg.steps)
        # One CPU generator drives batches and sampled searches, so runs match across devices. With several
        # processes it draws the (global) batches, the same on every rank, and each rank samples its searches
        # with its own generator.
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.search_gen = self.gen if self.world_size == 1 else self._rank_generator(0)
        self.step = 0
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.metric_name = METRIC_NAMES[self.model.cfg.head]
        self.eval_sets = {split: self.task.eval_batches(cfg.eval_size, cfg.eval_batch, cfg.eval_seed, self.device,
                                                        split=split)
                          for split in self.task.eval_splits}
        if cfg.init_from:  # a resume (here or in a subclass) then replaces these weights with the run's own
            self.init_weights(cfg.init_from)
        if load and cfg.resume and self.ckpt_path.exists():
            self.load(self.ckpt_path)

    #: train-config fields a resumed run must share with its checkpoint (the model config is checked whole)
    RESUME_FIELDS = ("task", "task_args", "seq_len", "query_positions", "kernel", "source", "decoder", "agent",
                     "agent_options", "batch_size")

    def _rank_generator(self, step: int) -> torch.Generator:
        """This rank's search generator of a multi-process run, seeded from (seed, rank, step)."""
        return torch.Generator().manual_seed(hash((self.cfg.seed, self.rank, step)) % 2**62)

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that logs, evaluates and writes."""
        return self.rank == 0

    def claim_run_dir(self) -> None:
        """Before writing: refuse a run dir that holds another run, unless this run resumed it or may overwrite it."""
        cfg = self.cfg
        previous = [p for p in (self.ckpt_path, self.run_dir / "results.json") if p.exists()]
        if not previous or (cfg.resume and self.step > 0):
            return
        if cfg.overwrite:
            for p in [*previous, *self.run_dir.glob("events.out.tfevents.*"), *self.run_dir.glob("*.agent.zip")]:
                p.unlink()
            return
        raise ValueError(f"run dir {self.run_dir} already holds a run ({previous[0].name}); pass --resume true to "
                         "continue it, --overwrite true to replace it, or another --run-dir")

    def model_config(self) -> ModelConfig:
        return self.cfg.model_config(self.task)

    # ------------------------------------------------------------------------------------- one step

    def _update(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        """One optimiser step on ``loss`` of ``batch``: backward on the forward's matmul route, gradients averaged
        over processes and clipped, the rate scheduled; returns the gradient norm before clipping."""
        self.opt.zero_grad(set_to_none=True)
        with model_backend.matmul_scope(batch.xc.shape[:2].numel()):
            loss.backward()
        distributed.average_gradients(list(self.model.parameters()), self.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.sched.step()
        return grad_norm

    def train_step(self, batch: Batch) -> dict[str, float]:
        """The paper's fused step: sampled search, L_TCA + lambda_CA L_CA + lambda_RL L_RL, one backward."""
        self.model.train()
        out = self.model(batch, search="sample", generator=self.search_gen)
        grad_norm = self._update(out.loss, batch)
        stats = {k: float(v) for k, v in out.terms.items()}
        stats[self.metric_name] = float(out.metric.mean())
        stats["grad_norm"] = float(grad_norm)
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy predictions on the fixed evaluation sets, per split: ``<split>/<metric>`` is the mean over
        batches of each batch's mean (the paper's metric), ``<split>/<metric>_pooled`` the mean over all
        queries pooled (:func:`~tca_env.tasks.base.summarize_metric`)."""
        self.model.eval()
        out: dict[str, float] = {}
        for split, batches in self.eval_sets.items():
            per_batch = [self.model.head.metric(self.model.predict(b), b.yt) for b in batches]
            self._summarize(out, split, per_batch)
        return out

    def _summarize(self, out: dict[str, float], split: str, per_batch: list[torch.Tensor]) -> None:
        out[f"{split}/{self.metric_name}"], out[f"{split}/{self.metric_name}_pooled"] = summarize_metric(per_batch)

    @torch.no_grad()
    def figure(self) -> Figure | None:
        """The task's figure (:meth:`Task.figure`) of greedy predictions on a fixed batch, or None.

        It draws the predictor's own greedy search: with an external ``--agent`` that is not the agent's path.
        """
        self.model.eval()
        batch = self.task.figure_batch(torch.Generator().manual_seed(self.cfg.eval_seed), self.device)
        return self.task.figure(batch, self.model.predict(batch), self.model.head)

    # ---------------------------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        return {"format": ckpt_io.FORMAT, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": ckpt_io.rng_state(self.gen), "step": self.step,
                "model_config": asdict(self.model.cfg), "train_config": asdict(self.cfg)}

    def save(self, path: Path | None = None) -> Path:
        path = path or self.ckpt_path
        return ckpt_io.save_atomic(self.state(), path) if self.is_main else path

    def _model_config_diff(self, ckpt: dict[str, Any], ignore: frozenset[str] = frozenset()) -> dict[str, tuple]:
        """``{field: (now, then)}`` where this model's config differs from a checkpoint's (fields added since
        the checkpoint was written take their defaults), ``ignore`` left out."""
        then = asdict(ModelConfig(**ckpt["model_config"]))
        return {k: (v, then.get(k)) for k, v in asdict(self.model.cfg).items() if k not in ignore and then.get(k) != v}

    #: model-config fields an --init-from run may change: the task's size, how training regularises, rewards and
    #: routes gradients (bptt), and the head count (every projection keeps its [D, D] shape: the same weights,
    #: split into another number of heads)
    INIT_FREE = frozenset({"max_context", "dropout", "policy_dropout", "policy_p", "agg_dropout", "lambda_ca",
                           "lambda_rl", "reward", "rl_baseline", "entropy_coef", "bptt", "nhead"})

    def init_weights(self, path: str | Path) -> None:
        """The model weights of another run's checkpoint (``--init-from``); nothing else of that run."""
        ckpt = ckpt_io.load(path, self.device)
        diff = self._model_config_diff(ckpt, ignore=self.INIT_FREE)
        if diff:
            raise ValueError(f"--init-from {path}: its model config differs from this run's (now, then): {diff}")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # e.g. Perceiver IO's latents, whose number follows max_context
            raise ValueError(f"--init-from {path}: its weights do not fit this run's model: {e}") from None

    def load(self, path: Path) -> dict[str, Any]:
        ckpt = ckpt_io.load(path, self.device)
        then = ckpt["train_config"]
        now = {k: getattr(self.cfg, k) for k in self.RESUME_FIELDS}
        diff = {k: (v, then.get(k)) for k, v in now.items() if then.get(k) != v}
        if diff:
            raise ValueError(f"checkpoint {path} belongs to a run with another configuration (now, then): {diff}; "
                             "pass --overwrite true to replace it or choose another --run-dir")
        # Fields added since the checkpoint was written take their defaults (they default to the old behaviour).
        diff = self._model_config_diff(ckpt)
        if diff:
            raise ValueError(f"checkpoint {path} was trained with another model config (now, then): {diff}")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        ckpt_io.set_rng_state(ckpt["rng"], self.gen)
        self.step = ckpt["step"]
        if self.world_size > 1:  # a checkpoint holds rank 0's batch generator; searches are re-seeded per rank
            self.search_gen = self._rank_generator(self.step)
        return ckpt

    # ------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.claim_run_dir()
        distributed.barrier()  # nobody starts before rank 0 has claimed the run dir
        self.writer = make_writer(self.run_dir) if self.is_main else _NoWriter()
        if self.is_main:  # the run's first log line: what runs the model
            print(f"{model_backend.describe()}; device {self.device}; {self.world_size} process(es)", flush=True)
        desc = f"{cfg.task}/{cfg.decoder}" + ("" if cfg.agent == "fused" else f"/{cfg.agent}")
        if self.world_size > 1:
            desc += f" x{self.world_size}"
        self.bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main), desc=desc,
                        dynamic_ncols=True)
        t0 = time.perf_counter()
        self._last_log = (t0, self.step)
        self.run()
        self.bar.close()
        wall = time.perf_counter() - t0
        report = {"task": cfg.task, "decoder": cfg.decoder, "agent": cfg.agent, "steps": self.step,
                  "batch_size": cfg.batch_size, "world_size": self.world_size, "backend": self.backend,
                  "model_backend": model_backend.backend(),
                  "wall_time_s": wall, "eval": {}, "tokens": self.retrieved_tokens(),
                  "max_context": self.task.max_context, "train_config": asdict(cfg),
                  "model_config": asdict(self.model.cfg)}
        if self.is_main:
            report["eval"] = evals = self.evaluate()
            self._log_eval(self.writer, evals, None)
            self.save()
            (self.run_dir / "results.json").write_text(json.dumps(report, indent=2))
        self.writer.close()
        distributed.barrier()  # the others end once rank 0 has written everything
        return report

    def run(self) -> None:
        """The fused loop: sample a batch of tasks, take one fused step, until ``steps`` updates."""
        while self.step < self.cfg.steps:
            batch = self.task.sample(self.cfg.batch_size, self.gen, self.device)
            if self.world_size > 1:  # this rank's contiguous slice of the global batch
                per = self.cfg.batch_size // self.world_size
                batch = batch.index(slice(self.rank * per, (self.rank + 1) * per))
            self.after_step(self.train_step(batch))

    def after_step(self, stats: dict[str, float]) -> None:
        """Count one predictor update; log (``train/...``, or the key itself if it has a ``/``), evaluate and
        checkpoint on schedule."""
        cfg = self.cfg
        self.step += 1
        self.bar.update(1)
        if not all(math.isfinite(v) for v in stats.values()):
            raise FloatingPointError(f"non-finite training statistics at step {self.step}: {stats}")
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            stats = distributed.average_stats(stats, self.world_size, self.device)  # every rank takes part
            now = time.perf_counter()
            last_t, last_step = self._last_log
            stats["steps_per_sec"] = (self.step - last_step) / (now - last_t)
            stats["lr"] = self.sched.get_last_lr()[0]
            self._last_log = (now, self.step)
            for k, v in stats.items():
                self.writer.add_scalar(k if "/" in k else f"train/{k}", v, self.step)
            self.bar.set_postfix(loss=f"{stats['loss']:.3f}",
                                 **{self.metric_name[:3]: f"{stats[self.metric_name]:.3f}"})
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.steps and self.is_main:
            self._log_eval(self.writer, self.evaluate(), self.bar)
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
            self.save()

    def _log_eval(self, writer, evals: dict[str, float], bar) -> None:
        for k, v in evals.items():
            writer.add_scalar(f"eval/{k}", v, self.step)
        fig = self.figure()
        if fig is not None:
            writer.add_figure("eval/figure", fig, self.step)
        msg = " ".join(f"{k}={v:.4f}" for k, v in evals.items())
        (bar.write if bar is not None else print)(f"step {self.step}: eval {msg}")

    def retrieved_tokens(self) -> int:
        """Tokens each query attends to at the task's largest context (the paper's % tokens numerator)."""
        m = self.model
        if m.cfg.decoder == "tca":
            return m.tree_shape(self.task.max_context).retrieved_size
        return m.num_latents if m.cfg.decoder == "perceiver" else self.task.max_context


class CoTrainer(Trainer):
    """Co-training with a search agent acting through the environment.

    One loop whatever the agent:

    1. the vector env samples a tree batch (``batch_size`` context sets) and the predictor builds its trees;
    2. the agent descends them: every query is one env slot, k steps each;
    3. the predictor is updated on the agent's retrieved sets by replaying its actions,
       ``model(batch, actions=...)``: L_TCA + lambda_CA L_CA (the model's own L_RL is switched off);
    4. the agent is updated by its own algorithm: REINFORCE here (for the shared attention policy, on the
       replay, in the same backward pass: the paper's step), SB3's inside ``learn``, where steps 3 and the
       logging run in a callback at each rollout end (one rollout = one tree batch).

    TensorBoard (one run directory): ``train/*`` for the predictor (losses, metric of the replayed
    prediction, lr, updates/s), ``agent/*`` for the agent (reward, metric, entropy, invalid-action rate,
    query-steps/s, and SB3's own scalars under ``agent/train/...``, ``agent/rollout/...``), ``eval/*`` for the
    greedy agent + predictor on the fixed evaluation sets.
    """

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        if cfg.agent == "fused":
            raise ValueError("--agent fused is the paper's fused step: use Trainer")
        if cfg.lambda_rl:
            raise ValueError("--lambda-rl weighs the fused agent's L_RL; an external agent owns its RL loss")
        super().__init__(cfg, load=False)
        M = self.task.sample(1, torch.Generator().manual_seed(0)).M
        self.native = cfg.agent in ("reinforce", "random")
        # One round per tree batch: each predictor update sees batch_size context sets, as in the fused step.
        # Under torchrun each process serves its share of them from its own env, seeded by its rank.
        per_rank = cfg.batch_size // self.world_size
        self.env = TreeRetrievalVectorEnv(per_rank * M, task=self.task, predictor=self.model,
                                          batch_size=per_rank, seed=cfg.seed + 1_000_003 * self.rank,
                                          record_batches=True, array_type="torch" if self.native else "numpy")
        self.agent = cotrain_agent(make_agent(cfg.agent, self.env, **self.agent_options()))  # agents.base.Agent
        self._obs: dict[str, Any] | None = None
        self._eval_envs: dict[int, TreeRetrievalVectorEnv] = {}
        self._last_update = time.perf_counter()
        if cfg.resume and self.ckpt_path.exists():
            self.load(self.ckpt_path)

    def model_config(self) -> ModelConfig:
        return replace(self.cfg.model_config(self.task), lambda_rl=0.0, rl_baseline="none")

    def agent_options(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.agent == "reinforce":
            base = {"lr": cfg.agent_lr or cfg.lr, "baseline": cfg.rl_baseline or "none", "seed": cfg.seed,
                    "entropy_coef": 0.01 if cfg.entropy_coef is None else cfg.entropy_coef}
        elif cfg.agent == "random":
            base = {"seed": cfg.seed}
        else:
            base = {"seed": cfg.seed, "device": cfg.device}
            if cfg.agent_lr is not None:
                base["learning_rate"] = cfg.agent_lr
            if cfg.entropy_coef is not None and cfg.agent != "dqn":
                base["ent_coef"] = cfg.entropy_coef
        return {**base, **cfg.agent_kwargs()}

    # ------------------------------------------------------------------------------------ one iteration

    def rollout(self, batch: Batch | None = None) -> tuple[FinishedBatch, Rollout]:
        """The agent descends one tree batch (the next one, or ``batch``): k steps of every env slot."""
        if batch is not None:
            self._obs, _ = self.env.reset(options={"batch": batch})
        elif self._obs is None:
            self._obs, _ = self.env.reset(seed=self.cfg.seed + self.step)
        self._obs, rollout = play_episodes(self.agent, self.env, self._obs)
        (finished,) = self.env.pop_finished()
        return finished, rollout

    def losses(self, fb: FinishedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The predictor's loss on the agent's paths, plus the shared policy's REINFORCE term."""
        self.model.train()
        out = self.model(fb.batch, actions=fb.actions)
        terms = {k: v for k, v in out.terms.items() if k not in ("loss_rl", "reward", "entropy")}
        loss = out.loss
        # A shared policy's REINFORCE term (the fused step's L_RL) on the same differentiable tree: the reward of
        # the training-mode prediction.
        reward = self.model.head.reward(out.out, fb.batch.yt, self.model.cfg.reward)
        l_rl = self.agent.replay_loss(out.descent.log_prob, out.descent.entropy, reward)
        if l_rl is not None:
            loss = loss + l_rl
            terms.update(loss_rl=l_rl.detach(), reward=reward.mean(), entropy=out.descent.entropy.detach().mean(),
                         loss=loss.detach())
        terms[self.metric_name] = out.metric.mean()
        return loss, terms

    def learn_from(self, fb: FinishedBatch) -> dict[str, float]:
        """One predictor update on a finished tree batch; returns its statistics and the agent's."""
        loss, terms = self.losses(fb)
        grad_norm = self._update(loss, fb.batch)
        stats = {k: float(v) for k, v in terms.items()}
        stats["grad_norm"] = float(grad_norm)
        now = time.perf_counter()
        query_steps = fb.actions.numel()
        stats.update({"agent/reward": float(fb.reward.mean()), "agent/metric": float(fb.metric.mean()),
                      "agent/invalid_action_rate": float(fb.invalid.sum()) / query_steps,
                      "agent/query_steps_per_sec": query_steps / max(now - self._last_update, 1e-9)})
        self._last_update = now
        return stats

    # ------------------------------------------------------------------------------------------ the loop

    def run(self) -> None:
        self.agent.run(self)

    # -------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy agent + predictor on the fixed evaluation sets (through the env): both averages per split."""
        agent = self.agent.eval_policy(self.cfg.eval_seed)  # an evaluation is a fixed function of the checkpoint
        out: dict[str, float] = {}
        for split, batches in self.eval_sets.items():
            per_batch = []
            for b in batches:
                env = self._eval_env(b.B)
                obs, _ = env.reset(options={"batch": b})
                while True:
                    obs, _, terminated, _, info = env.step(sb3_predict(agent, obs, deterministic=True))
                    if terminated.all():
                        break
                per_batch.append(torch.as_tensor(info["final_info"]["metric"]))
            self._summarize(out, split, per_batch)
        return out

    def _eval_env(self, B: int) -> TreeRetrievalVectorEnv:
        if B not in self._eval_envs:
            M = self.env.queries.M
            self._eval_envs[B] = TreeRetrievalVectorEnv(B * M, task=self.task, predictor=self.model, batch_size=B)
        return self._eval_envs[B]

    # ------------------------------------------------------------------------------------- checkpoints

    def save(self, path: Path | None = None) -> Path:
        """Checkpoint with the agent: its state inside, or (SB3) its own zip beside it, both written atomically."""
        path = Path(path or self.ckpt_path)
        state = self.state()
        state["agent"] = {"name": self.cfg.agent, **self.agent.save(path)}
        return ckpt_io.save_atomic(state, path)

    def load(self, path: Path) -> dict[str, Any]:
        ckpt = super().load(path)
        saved = ckpt.get("agent")
        if saved is None or saved.get("name") != self.cfg.agent:
            found = "no agent" if saved is None else f"agent {saved.get('name')!r}"
            raise ValueError(f"checkpoint {path} holds {found}; this run uses --agent {self.cfg.agent}")
        self.agent.load(Path(path), saved)
        return ckpt


def make_trainer(cfg: TrainConfig) -> Trainer:
    """The fused paper trainer for ``--agent fused``, the co-trainer through the env for any other agent."""
    return Trainer(cfg) if cfg.agent == "fused" else CoTrainer(cfg)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ReTreever, dict[str, Any]]:
    """A trained model (in eval mode) and its checkpoint dict."""
    return load_predictor(path, device)
