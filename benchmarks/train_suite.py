"""Train (or re-export) the predictors shipped in ``tca_env/pretrained/`` behind the benchmark env ids.

Each entry is a ``tca train`` command from a fixed seed; the run is resumable (``--resume true``) and its
final checkpoint is exported as ``<name>.safetensors`` + ``<name>.json`` (task, options, model config,
command, steps, held-out metric, sha256) by :func:`tca_env.pretrained.export`.

    OMP_NUM_THREADS=1 python benchmarks/train_suite.py                      # every entry (GP: 1-2 CPU hours)
    OMP_NUM_THREADS=1 python benchmarks/train_suite.py --only copy-easy     # one entry (~3 CPU minutes)
    python benchmarks/train_suite.py --only gp --checkpoint gp=results/gp-paper/saved/gp-tca-s0/checkpoint.pt
                                                                            # export an existing run instead
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from tca_env import pretrained

#: name -> (``tca train`` arguments, what it is)
SUITE: dict[str, tuple[list[str], str]] = {
    "copy-easy": (["--task", "copy", "--preset", "quick", "--seed", "0"],
                  "copy task, L = 64 (32 context tokens, 32 queries), the quick preset"),
    "copy-medium": (["--task", "copy", "--preset", "cpu", "--decoder", "tca", "--policy-dropout", "false",
                     "--lr-horizon", "8000", "--steps", "8000", "--seed", "0"],
                    "copy task, L = 256 (128 context tokens, 128 queries), the reference's copy setting at batch 16 "
                    "but without the policy's dropout and with the rate decayed over the 8,000 steps: its search "
                    "policy is imperfect (greedy 87.9%), so an agent can beat it"),
    "gp": (["--task", "gp", "--kernel", "rbf", "--enc-layers", "6", "--steps", "100000", "--batch-size", "16",
            "--eval-every", "10000", "--eval-size", "16000", "--eval-batch", "16", "--ckpt-every", "2000",
            "--seed", "0"],
           "GP regression (RBF), the paper's model and budget (100,000 steps x 16)"),
    "recall": (["--task", "recall", "--preset", "cpu", "--decoder", "tca", "--seed", "0"],
               "associative recall, N drawn log-uniformly in [8, 1,024] per batch, 256 queries per set, reward -CE "
               "with a batch-mean baseline, 20,000 steps x 16 (the cpu preset; about 90 CPU minutes); its search "
               "is imperfect (held-out 67.8% on mixed N; at N = 1,024 it reaches the right leaf for about 30% of "
               "the queries), so an agent can beat it"),
}

ROOT = Path(__file__).resolve().parents[1]


def command(name: str) -> str:
    return "tca train " + " ".join(shlex.quote(a) for a in SUITE[name][0])


def train(name: str, runs_dir: Path) -> Path:
    run_dir = runs_dir / name
    args = [sys.executable, "-m", "training.cli", "train", *SUITE[name][0], "--run-dir", str(run_dir),
            "--resume", "true", "--progress", "false"]
    print(f"[suite] {name}: {command(name)}", flush=True)
    subprocess.run(args, check=True, cwd=ROOT)
    return run_dir / "checkpoint.pt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(SUITE), default=sorted(SUITE), help="Entries to build.")
    p.add_argument("--runs-dir", default="runs/suite", help="Where the training runs go (resumable).")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="Export this existing checkpoint for NAME instead of training it.")
    p.add_argument("--out", default=str(pretrained.DIR), help="Where the .safetensors/.json pairs go.")
    args = p.parse_args(argv)
    given = dict(item.split("=", 1) for item in args.checkpoint)
    unknown = set(given) - set(SUITE)
    if unknown:
        p.error(f"--checkpoint for unknown entries {sorted(unknown)}; entries: {sorted(SUITE)}")
    for name in args.only:
        ckpt = Path(given[name]) if name in given else train(name, Path(args.runs_dir))
        meta = pretrained.export(ckpt, name, command(name), args.out, note=SUITE[name][1])
        size = (Path(args.out) / f"{name}.safetensors").stat().st_size
        print(f"[suite] {name}: {meta['steps']} steps, held-out {meta['held_out']}, {size / 1e6:.2f} MB, "
              f"sha256 {meta['sha256'][:12]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
