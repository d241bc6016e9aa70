"""Time a training step and greedy inference, and measure peak inference memory, for tca / ca / perceiver.

The paper's copy-task model (D = 64, 4 heads, feed-forward 128, embedder depth 4, no encoder, b = 2),
batch 16, sequence lengths L in {256, 1024, 4096} (L/2 context tokens and L/2 queries). Every
(decoder, L, measurement) runs in a fresh process, so peak memory is that of the measured work alone:
the peak resident set size during the first greedy inference minus the resident size just before it,
with glibc's default allocator ("memory") and with large tensors mapped individually ("memory_live",
see LIVE_ENV).

    python benchmarks/speed.py                       # all, writes bench_out/speed.{json,md}
    python benchmarks/speed.py --lengths 256 --repeats 5
    python benchmarks/speed.py --backends torch compile --lengths 256 1024   # eager and torch.compile side by side

``--backends``: each backend's rows are labelled ``decoder`` (torch, eager) or ``decoder/compile`` and their
ratios are to ca on the same backend; a compiled worker warms up (compiles) before it is timed, and its
memory is not measured (compilation's own memory would dominate).

Timings are medians; compare ratios within one run (the machine is noisy). Nothing here asserts.
Also draws speed.png (time and memory against L); ``--replot`` redraws it from speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tca_env.model import DECODERS


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(decoder: str, seq_len: int, what: str, batch: int, iters: int, threads: int, device: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(threads)
    from tca_env.model import ModelConfig, ReTreever
    from tca_env.tasks import make_task

    task = make_task("copy", seq_len=seq_len)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, decoder=decoder, encoder="constant", dropout=0.1)).to(device)
    data = task.sample(batch, torch.Generator().manual_seed(0)).to(device)
    out: dict = {"decoder": decoder, "seq_len": seq_len, "what": what, "device": device}
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if what == "memory" and cuda:  # device memory: the allocator's peak above what the model and batch hold
        model.eval()
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model.predict(data)
        sync()
        out.update(peak_mib=(torch.cuda.max_memory_allocated() - before) / 2**20)
        return out
    if what == "memory":
        from scale import reset_peak

        from tca_env import backend

        backend.matmul_route()  # its one-off probe (a few MiB of test products) is not the model's memory
        model.eval()
        reset_peak()  # so that the probe's peak does not mask the predict's
        before, peak_before = rss_mib(), peak_mib()
        model.predict(data)
        out.update(rss_before_mib=before, peak_before_mib=peak_before, peak_mib=peak_mib() - before)
        return out
    if what == "infer":
        model.eval()
        fn = lambda: model.predict(data)  # noqa: E731
    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), 5e-4)
        gen = torch.Generator().manual_seed(0)

        def fn():
            o = model(data, generator=gen)
            opt.zero_grad()
            o.loss.backward()
            opt.step()
    fn()  # warm-up (and, on the compile backend, compilation: a second call settles any recompile)
    if os.environ.get("TCA_BACKEND") == "compile":
        fn()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    out.update(ms=1000 * statistics.median(times), all_ms=[1000 * t for t in times])
    return out


LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
"""glibc setting for the "live" memory column: every tensor over 1 MiB gets its own mapping and is
returned to the OS when freed, so the peak RSS is the peak of live tensors rather than of heap
fragmentation (which varies run to run with thread scheduling). Applied identically to every decoder."""


def run(decoder, seq_len, what, args, extra_env=None, backend="torch") -> dict:
    cmd = [sys.executable, __file__, "--worker", decoder, str(seq_len), what, "--batch", str(args.batch),
           "--iters", str(args.iters), "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TCA_BACKEND": backend, **(extra_env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"{decoder} L={seq_len} {what} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


COLUMNS = [("train", "train step (ms)"), ("infer", "greedy inference (ms)"),
           ("memory", "peak inference memory (MiB)"), ("memory_live", "peak live memory (MiB)")]


def table(results: dict) -> str:
    head = [c for _, c in COLUMNS] + [f"{key} / ca" for key, _ in COLUMNS]
    lines = ["| L | decoder | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 2)]
    for L, per in results.items():
        ca_of = {dec.split("/")[1] if "/" in dec else "": r for dec, r in per.items() if dec.split("/")[0] == "ca"}
        for dec, r in per.items():
            ca = ca_of.get(dec.split("/")[1] if "/" in dec else "", {})
            cells = [str(L), dec]
            cells += ["-" if r.get(key) is None else f"{r[key]:.1f}" for key, _ in COLUMNS]
            cells += ["-" if r.get(key) is None or not ca.get(key) else f"{r[key] / ca[key]:.2f}x"
                      for key, _ in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str = "") -> None:
    """Greedy inference time, training step and peak memory against L, one line per decoder (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("infer", "greedy inference (ms)"), ("train", "training step (ms)"), ("memory", "peak memory (MiB)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, panels, strict=True):
        labels = sorted({dec for per in results.values() for dec in per})
        for dec in labels:
            pts = [(int(L), per[dec][key]) for L, per in results.items() if per.get(dec, {}).get(key) is not None]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=dec)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="Sequence lengths L.")
    p.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=DECODERS, help="Read-outs to compare.")
    p.add_argument("--batch", type=int, default=16, help="Batch size (paper benchmark: 16).")
    p.add_argument("--iters", type=int, default=5, help="Timed iterations per process (median is reported).")
    p.add_argument("--repeats", type=int, default=3, help="Fresh processes per measurement (median of medians).")
    p.add_argument("--train-max-len", type=int, default=1024, help="Skip training-step timing above this L.")
    p.add_argument("--device", default="cpu", help="Torch device (cuda: times synchronise the device; memory is the "
                   "CUDA allocator's peak, and the 'live' column repeats it).")
    p.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "compile"],
                   help="Model backends to time side by side (tca_env.backend; default: eager only).")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared 2-core machine).")
    p.add_argument("--out", default="bench_out", help="Directory for speed.json and speed.md.")
    p.add_argument("--replot", action="store_true", help="Only redraw speed.png from the speed.json in --out.")
    p.add_argument("--worker", nargs=3, metavar=("DECODER", "L", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.replot:
        data = json.loads((Path(args.out) / "speed.json").read_text())
        plot(data["results"], Path(args.out) / "speed.png", "copy-task model, batch 16, one thread")
        return
    if args.worker:
        dec, L, what = args.worker
        print(json.dumps(worker(dec, int(L), what, args.batch, args.iters, args.threads, args.device)))
        return
    label = {(dec, be): dec if be == "torch" else f"{dec}/{be}" for dec in args.decoders for be in args.backends}
    results: dict = {L: {label[k]: {} for k in label} for L in args.lengths}
    for L in args.lengths:
        whats = ["infer", "memory", "memory_live"] + (["train"] if L <= args.train_max_len else [])
        for what in whats:
            keys = [k for k in label if not (what.startswith("memory") and k[1] != "torch")]
            runs: dict = {k: [] for k in keys}
            for _ in range(args.repeats):  # interleave decoders so drifting load hits all of them alike
                for dec, be in keys:
                    if what.startswith("memory"):
                        r = run(dec, L, "memory", args, LIVE_ENV if what == "memory_live" else None)
                        runs[dec, be].append(r["peak_mib"])
                    else:
                        runs[dec, be].append(run(dec, L, what, args, backend=be)["ms"])
            for k in keys:
                results[L][label[k]][what] = statistics.median(runs[k])
                results[L][label[k]][f"{what}_runs"] = runs[k]
            print(f"L={L} {what}: " + ", ".join(f"{label[k]}={results[L][label[k]][what]:.1f}" for k in keys),
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"batch": args.batch, "threads": args.threads, "backends": args.backends, "device": args.device,
            "iters": args.iters, "repeats": args.repeats,
            "model": "copy task, D=64, 4 heads, ff 128, emb depth 4, no encoder, b=2"}
    (out / "speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "speed.md").write_text(table(results) + "\n")
    plot(results, out / "speed.png", "copy-task model, batch 16, one thread")
    print(table(results))


if __name__ == "__main__":
    main()
