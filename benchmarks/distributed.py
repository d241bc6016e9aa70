"""Data-parallel training with torchrun on one machine: throughput, learning, and recovery from a killed rank.

* ``throughput``: the copy task (``--preset cpu``, L = 256, tca) for ``--steps`` steps on 1 and on 2 processes
  (one thread each, fresh run directories, evaluation only at the end, outside the timed loop); steps per
  second from each run's own wall time, and the final
  held-out accuracy of both (run with ``--steps 8000`` for the learning curves: TensorBoard runs in ``--out``).
* ``failure``: a 2-process run under ``torchrun --max-restarts 3`` whose rank 1 is killed (SIGKILL) once the first
  checkpoint exists; torchrun restarts both workers with the same arguments (``--resume true``), which continue
  from the last checkpoint. Reports the step resumed from and whether the run then finished with an intact
  checkpoint.

    python benchmarks/distributed.py throughput --steps 300
    python benchmarks/distributed.py throughput --steps 8000 --decoder ca --eval-every 1000 \
        --out results/distributed/curves     # learning curves of 1 and 2 processes
    python benchmarks/distributed.py failure

Nothing here asserts; it prints and writes ``distributed.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def launch(args: list[str], procs: int, extra: list[str] | None = None) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                *(extra or [])]
    cmd = (launcher if procs > 1 else [sys.executable]) + ["-m", "training.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def run_report(run_dir: Path) -> dict:
    report = json.loads((run_dir / "results.json").read_text())
    return {"steps_per_s": report["steps"] / report["wall_time_s"], "wall_time_s": report["wall_time_s"],
            "accuracy": report["eval"]["test/accuracy"], "world_size": report["world_size"]}


def throughput(out: Path, steps: int, decoder: str = "tca", eval_every: int = 0, batch_size: int = 16,
               repeats: int = 1, procs_to_run: tuple[int, ...] = (1, 2)) -> dict:
    """1 and 2 processes alternately, ``repeats`` times; the speed-up is the median of the per-pair ratios (a
    pair runs back to back, so a slow spell of the shared machine hits both sides of a ratio alike).
    ``procs_to_run`` = (1,) or (2,) runs one side only and reads the other side's finished run from its run
    directory (long learning curves: the 1-process run can share the machine, the 2-process one cannot)."""
    res: dict = {"batch_size": batch_size, "runs": {1: [], 2: []}}
    run_dirs = {procs: out / f"copy256-{decoder}-p{procs}" for procs in (1, 2)}  # each repeat replaces the last
    for procs, run_dir in run_dirs.items():
        if procs not in procs_to_run:
            if (run_dir / "results.json").exists():  # the other side, run earlier (no speed-up if absent)
                res["runs"][procs] = [run_report(run_dir)] * repeats
    for _ in range(repeats):
        for procs, run_dir in run_dirs.items():
            if procs not in procs_to_run:
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            args = ["--task", "copy", "--preset", "cpu", "--decoder", decoder, "--steps", str(steps),
                    "--batch-size", str(batch_size), "--eval-every", str(eval_every), "--ckpt-every", str(steps),
                    "--run-dir", str(run_dir), "--progress", "false"]
            p = launch(args, procs)
            log, _ = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"{procs}-process run failed:\n{log[-3000:]}")
            run = run_report(run_dir)
            res["runs"][procs].append(run)
            print(f"batch {batch_size}, {procs} process(es): {run['steps_per_s']:.2f} steps/s, "
                  f"accuracy {run['accuracy']:.4f}", flush=True)
    if res["runs"][1] and res["runs"][2]:
        ratios = [b["steps_per_s"] / a["steps_per_s"] for a, b in zip(res["runs"][1], res["runs"][2], strict=True)]
        res["speedups"] = ratios
        res["speedup"] = statistics.median(ratios)
        print(f"speed-up with 2 processes (batch {batch_size}): median {res['speedup']:.2f}x of "
              f"{', '.join(f'{r:.2f}' for r in ratios)}")
    if eval_every:
        from fidelity import scalars  # benchmarks/fidelity.py: a run's TensorBoard scalar over all its event files

        res["curves"] = {procs: dict(scalars(run_dir, "eval/test/accuracy")) for procs, run_dir in run_dirs.items()
                         if (run_dir / "results.json").exists()}
        plot_curves(res["curves"], decoder, batch_size, out / "curves.png")
    return res


def plot_curves(curves: dict[int, dict[int, float]], decoder: str, batch_size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for procs, points in curves.items():
        steps = sorted(points)
        ax.plot(steps, [100 * points[s] for s in steps], marker="o", label=f"{procs} process(es)")
    ax.set(xlabel=f"step (global batch of {batch_size})", ylabel="held-out accuracy (%)",
           title=f"copy L = 256, {decoder}: 1 vs 2 processes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def children(pid: int) -> list[int]:
    """Child pids of ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def failure(out: Path, steps: int) -> dict:
    import torch

    run_dir = out / "killed"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--task", "copy", "--seq-len", "64", "--encoder", "constant", "--steps", str(steps), "--ckpt-every", "20",
            "--eval-every", "0", "--run-dir", str(run_dir), "--resume", "true", "--progress", "false"]
    p = launch(args, 2, ["--max-restarts", "3"])
    ckpt = run_dir / "checkpoint.pt"
    while not ckpt.exists():
        if p.poll() is not None:
            raise SystemExit(f"the run ended before its first checkpoint:\n{p.stdout.read()[-3000:]}")
        time.sleep(0.2)
    time.sleep(1.0)
    workers = sorted(children(p.pid))
    step_before = torch.load(ckpt, weights_only=True)["step"]
    os.kill(workers[-1], signal.SIGKILL)  # the later-started worker: rank 1
    print(f"killed worker {workers[-1]} (checkpoint at step {step_before})", flush=True)
    log, _ = p.communicate(timeout=900)
    (out / "killed.log").write_text(log)
    final = torch.load(ckpt, weights_only=True)
    report = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else None
    res = {"returncode": p.returncode, "killed_at_checkpoint_step": step_before, "final_step": final["step"],
           "finished": report is not None and report["steps"] == steps,
           "worker_killed_and_restarted": "exitcode: -9" in log and p.returncode == 0}
    print(json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("throughput", "failure"), help="Which measurement.")
    p.add_argument("--steps", type=int, default=300, help="Training steps per run (throughput; failure uses 120).")
    p.add_argument("--decoder", default="tca", choices=("tca", "ca", "perceiver"), help="Decoder (throughput).")
    p.add_argument("--eval-every", type=int, default=0,
                   help="Held-out evaluations during the runs, for learning curves (throughput; 0: only at the end, "
                        "outside the timed loop; evaluations inside it slow both runs alike).")
    p.add_argument("--batch-size", type=int, default=16,
                   help="Global batch of context sets (throughput; split evenly over the processes). 16 is the cpu "
                        "preset's, 128 the paper's.")
    p.add_argument("--repeats", type=int, default=1,
                   help="Pairs of 1- and 2-process runs (throughput); the speed-up is the median of their ratios.")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], choices=(1, 2),
                   help="Which sides to run (throughput): `--procs 1` alone runs the 1-process run (it may share the "
                        "machine with other work), a later `--procs 2` runs the 2-process one and reads the first "
                        "from its run directory. Default both, back to back.")
    p.add_argument("--out", default="bench_out/distributed", help="Output directory (run dirs and distributed.json).")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "throughput":
        res = throughput(out, args.steps, args.decoder, args.eval_every, args.batch_size, args.repeats,
                         tuple(args.procs))
    else:
        res = failure(out, 120)
    path = out / "distributed.json"
    prev = json.loads(path.read_text()) if path.exists() else {}
    prev[args.what if args.what == "failure" else f"throughput_b{args.batch_size}"] = res
    path.write_text(json.dumps(prev, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
