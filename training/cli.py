"""``tca``: train and evaluate ReTreever, and check a task, from the command line.

    tca train --task copy --preset quick            # a few CPU minutes, prints held-out accuracy
    tca train --task copy --preset cpu --decoder ca # the shipped L = 256 config, full cross attention
    tca train --task copy --seq-len 128 --agent maskable_ppo --run-dir runs/copy-mppo  # an SB3 agent co-trains
    tca eval --checkpoint runs/copy-tca-fused-quick/checkpoint.pt   # greedy predictor (+ its agent, if it had one)
    tca check-task --checkpoint runs/copy-tca-fused-quick/checkpoint.pt  # does the reward depend on the path?
    tca train --task my_pkg.my_tasks:MyTask --task-args '{"n": 10}'    # your own Task subclass
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import fields
from typing import Any

from .config import PRESETS, TrainConfig, build_config


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; string annotations resolved by the caller."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_config_flags(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        tp = _base_type(hints[f.name])
        default = f.default
        help_ = f.metadata.get("help", "")
        help_ += " (default: %s)" % ("task/paper default" if default is None else default)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, help=help_,
                       type=_bool if tp is bool else tp, choices=f.metadata.get("choices"),
                       metavar=None if tp is not bool else "{true,false}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tca", description="Tree Cross Attention (ReTreever) as a reinforcement-"
                                "learning environment: train, evaluate, and check a task's reward.")
    sub = p.add_subparsers(dest="command", required=True)
    presets = ", ".join(f"{t}: {'/'.join(ps)}" for t, ps in PRESETS.items())
    tr = sub.add_parser("train", help="Train a model on a task.",
                        description="Train ReTreever (decoder tca) or a baseline (ca, perceiver). Flags override "
                        "the preset, which overrides the defaults. TensorBoard events, checkpoint.pt and "
                        "results.json go to --run-dir.")
    tr.add_argument("--preset", default=None, help=f"Named configuration per task ({presets}).")
    add_config_flags(tr)
    ev = sub.add_parser("eval", help="Evaluate a checkpoint greedily on a fixed held-out set.",
                        description="Greedy evaluation of a saved model on the task's fixed evaluation sets.")
    ev.add_argument("--checkpoint", required=True, help="Path to a checkpoint.pt written by `tca train`.")
    ev.add_argument("--eval-size", type=int, default=None, help="Evaluation tasks (default: as trained).")
    ev.add_argument("--eval-seed", type=int, default=None, help="Evaluation seed (default: as trained).")
    ev.add_argument("--context-len", type=int, default=None, help="Evaluate at exactly this many context tokens "
                    "N, whatever the training sizes (tasks with a context_len option, e.g. recall: the same weights "
                    "at N = 2^10 ... 2^20).")
    ev.add_argument("--eval-batch", type=int, default=None, help="Context sets per evaluation batch (default: as "
                    "trained; lower it for a large --context-len).")
    ev.add_argument("--device", default="cpu", help="Torch device (default: cpu).")
    ev.add_argument("--json", action="store_true", help="Print the result as JSON.")
    ev.add_argument("--png", default=None, help="Also save the task's figure (GP fits, image completions) here.")
    ck = sub.add_parser("check-task", help="Check that a task's leaf reward depends on the path (for task authors).",
                        description="Plays the trained predictor's greedy policy, a random policy and the leftmost "
                        "policy on the same fixed-seed episodes of the checkpoint's task and reports their mean "
                        "leaf reward. If greedy does not beat random by --margin, the path does not matter: an "
                        "agent would have nothing to learn (tca_env.check).")
    ck.add_argument("--checkpoint", required=True, help="A trained predictor's checkpoint.pt (its task is checked).")
    ck.add_argument("--episodes", type=int, default=2048, help="Episodes per policy (default: 2048).")
    ck.add_argument("--seed", type=int, default=0, help="Seed of the episodes (default: 0).")
    ck.add_argument("--margin", type=float, default=0.05, help="Greedy-minus-random reward gap that counts as "
                    "depending on the path (default: 0.05).")
    ck.add_argument("--device", default="cpu", help="Torch device (default: cpu).")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .cotrain import make_trainer

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "preset")}
    cfg = build_config(args.preset, **flags)
    trainer = make_trainer(cfg)
    try:
        report = trainer.fit()
    finally:
        distributed.shutdown()
    if not trainer.is_main:  # under torchrun rank 0 reports
        return 0
    evals = " ".join(f"{k}={v:.4f}" for k, v in report["eval"].items())
    print(f"done: {report['steps']} steps in {report['wall_time_s']:.0f} s; held-out {evals}; "
          f"tokens per query {report['tokens']} of {report['max_context']}; run dir {cfg.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .cotrain import load_model, make_trainer

    model, ckpt = load_model(args.checkpoint, args.device)
    overrides = {"device": args.device, "resume": False, "progress": False}
    if args.eval_size is not None:
        overrides["eval_size"] = args.eval_size
    if args.eval_seed is not None:
        overrides["eval_seed"] = args.eval_seed
    if args.eval_batch is not None:
        overrides["eval_batch"] = args.eval_batch
    if args.context_len is not None:
        overrides.update(context_len=args.context_len, min_context_len=None)
    cfg = TrainConfig(**{**ckpt["train_config"], **overrides})
    trainer = make_trainer(cfg)
    if cfg.agent == "fused":
        trainer.model.load_state_dict(model.state_dict())
    else:
        trainer.load(args.checkpoint)  # the predictor and its agent, evaluated together through the env
    result = trainer.evaluate()
    if args.png is not None:
        fig = trainer.figure()
        if fig is None:
            raise ValueError(f"task {cfg.task!r} has no figure to save as {args.png}")
        fig.savefig(args.png, dpi=120)
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return 0


def cmd_check_task(args: argparse.Namespace) -> int:
    from tca_env.check import check_task

    from .cotrain import load_model

    model, ckpt = load_model(args.checkpoint, args.device)
    cfg = TrainConfig(**ckpt["train_config"])
    result = check_task(cfg.make_task(), model, episodes=args.episodes, seed=args.seed, margin=args.margin,
                        device=args.device)
    print(f"task {cfg.task} {cfg.task_options()}:")
    print(result.report(), end="")
    return 0 if result.path_matters else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "eval": cmd_eval, "check-task": cmd_check_task}[args.command](args)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as e:  # one line, not a traceback
        print(f"tca {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
