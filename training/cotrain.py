"""The training loop: sample tasks, search the trees, update the predictor (and the search policy).

Read it top to bottom: :meth:`Trainer.fit` is the loop; :meth:`Trainer.train_step` is the paper's
fused step, where the attention policy is the read-out's own attention, trained by REINFORCE inside
one forward/backward together with L_TCA and L_CA (DESIGN.md section 5).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tca_env.checkpoint import load_predictor
from tca_env.model import ReTreever
from tca_env.tasks import Batch

from . import checkpoint as ckpt_io
from .config import TrainConfig

METRIC_NAMES = {"class": "accuracy", "normal": "log_likelihood", "reg": "neg_mse"}


def make_writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import

    return SummaryWriter(log_dir=str(run_dir))


class Trainer:
    """Trains a ReTreever (or its CA / Perceiver IO baselines) on one task."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.task = cfg.make_task()
        torch.manual_seed(cfg.seed)
        self.model = ReTreever(cfg.model_config(self.task)).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.steps)
        # One CPU generator drives batches and sampled searches, so runs match across devices.
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.metric_name = METRIC_NAMES[self.model.cfg.head]
        self.eval_sets = {split: self.task.eval_batches(cfg.eval_size, cfg.eval_batch, cfg.eval_seed, self.device,
                                                        split=split)
                          for split in self.task.eval_splits}
        if cfg.resume and self.ckpt_path.exists():
            self.load(self.ckpt_path)

    # ------------------------------------------------------------------------------------- one step

    def train_step(self, batch: Batch) -> dict[str, float]:
        """The paper's fused step: sampled search, L_TCA + lambda_CA L_CA + lambda_RL L_RL, one backward."""
        self.model.train()
        out = self.model(batch, search="sample", generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        self.sched.step()
        stats = {k: float(v) for k, v in out.terms.items()}
        stats[self.metric_name] = float(out.metric.mean())
        stats["grad_norm"] = float(grad_norm)
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy predictions on the fixed evaluation sets: the mean metric per split."""
        self.model.eval()
        out: dict[str, float] = {}
        for split, batches in self.eval_sets.items():
            total, count = 0.0, 0
            for b in batches:
                m = self.model.head.metric(self.model.predict(b), b.yt)
                total += float(m.sum())
                count += m.numel()
            out[f"{split}/{self.metric_name}"] = total / count
        return out

    # ---------------------------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        return {"format": ckpt_io.FORMAT, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": ckpt_io.rng_state(self.gen), "step": self.step,
                "model_config": asdict(self.model.cfg), "train_config": asdict(self.cfg)}

    def save(self, path: Path | None = None) -> Path:
        return ckpt_io.save_atomic(self.state(), path or self.ckpt_path)

    def load(self, path: Path) -> None:
        ckpt = ckpt_io.load(path, self.device)
        if ckpt["model_config"] != asdict(self.model.cfg):
            diff = {k: (v, ckpt["model_config"].get(k)) for k, v in asdict(self.model.cfg).items()
                    if ckpt["model_config"].get(k) != v}
            raise ValueError(f"checkpoint {path} was trained with another model config (now, then): {diff}")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        ckpt_io.set_rng_state(ckpt["rng"], self.gen)
        self.step = ckpt["step"]

    # ------------------------------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        writer = make_writer(self.run_dir)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=f"{cfg.task}/{cfg.decoder}",
                   dynamic_ncols=True)
        t0, last_t, last_step = time.perf_counter(), time.perf_counter(), self.step
        evals: dict[str, float] = {}
        while self.step < cfg.steps:
            batch = self.task.sample(cfg.batch_size, self.gen, self.device)
            stats = self.train_step(batch)
            self.step += 1
            bar.update(1)
            if not all(math.isfinite(v) for v in stats.values()):
                raise FloatingPointError(f"non-finite training statistics at step {self.step}: {stats}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                stats["steps_per_sec"] = (self.step - last_step) / (now - last_t)
                stats["lr"] = self.sched.get_last_lr()[0]
                last_t, last_step = now, self.step
                for k, v in stats.items():
                    writer.add_scalar(f"train/{k}", v, self.step)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", **{self.metric_name[:3]: f"{stats[self.metric_name]:.3f}"})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.steps:
                evals = self.evaluate()
                self._log_eval(writer, evals, bar)
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
        bar.close()
        wall = time.perf_counter() - t0
        evals = self.evaluate()
        self._log_eval(writer, evals, None)
        self.save()
        writer.close()
        report = {"task": cfg.task, "decoder": cfg.decoder, "steps": self.step, "batch_size": cfg.batch_size,
                  "wall_time_s": wall, "eval": evals, "tokens": self.retrieved_tokens(),
                  "max_context": self.task.max_context, "train_config": asdict(cfg),
                  "model_config": asdict(self.model.cfg)}
        (self.run_dir / "results.json").write_text(json.dumps(report, indent=2))
        return report

    def _log_eval(self, writer, evals: dict[str, float], bar) -> None:
        for k, v in evals.items():
            writer.add_scalar(f"eval/{k}", v, self.step)
        msg = " ".join(f"{k}={v:.4f}" for k, v in evals.items())
        (bar.write if bar is not None else print)(f"step {self.step}: eval {msg}")

    def retrieved_tokens(self) -> int:
        """Tokens each query attends to at the task's largest context (the paper's % tokens numerator)."""
        m = self.model
        if m.cfg.decoder == "tca":
            return m.tree_shape(self.task.max_context).retrieved_size
        return m.num_latents if m.cfg.decoder == "perceiver" else self.task.max_context


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ReTreever, dict[str, Any]]:
    """A trained model (in eval mode) and its checkpoint dict."""
    return load_predictor(path, device)
