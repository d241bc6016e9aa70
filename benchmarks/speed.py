"""Time a training step and greedy inference, and measure peak inference memory, for tca / ca / perceiver.

The paper's copy-task model (D = 64, 4 heads, feed-forward 128, embedder depth 4, no encoder, b = 2),
batch 16, sequence lengths L in {256, 1024, 4096} (L/2 context tokens and L/2 queries). Every
(decoder, L, measurement) runs in a fresh process, so peak memory is that of the measured work alone:
the peak resident set size during the first greedy inference minus the resident size just before it.

    python benchmarks/speed.py                       # all, writes bench_out/speed.{json,md}
    python benchmarks/speed.py --lengths 256 --repeats 5

Timings are medians; compare ratios within one run (the machine is noisy). Nothing here asserts.
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

DECODERS = ("tca", "ca", "perceiver")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(decoder: str, seq_len: int, what: str, batch: int, iters: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from tca_env.model import ModelConfig, ReTreever
    from tca_env.tasks import make_task

    task = make_task("copy", seq_len=seq_len)
    torch.manual_seed(0)
    model = ReTreever(ModelConfig.for_task(task, decoder=decoder, encoder="constant", dropout=0.1))
    data = task.sample(batch, torch.Generator().manual_seed(0))
    out: dict = {"decoder": decoder, "seq_len": seq_len, "what": what}
    if what == "memory":
        model.eval()
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
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    out.update(ms=1000 * statistics.median(times), all_ms=[1000 * t for t in times])
    return out


def run(decoder, seq_len, what, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", decoder, str(seq_len), what, "--batch", str(args.batch),
           "--iters", str(args.iters), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"{decoder} L={seq_len} {what} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = ["| L | decoder | train step (ms) | greedy inference (ms) | peak inference memory (MiB) |"
             " train / ca | infer / ca | memory / ca |", "|---|---|---|---|---|---|---|---|"]
    for L, per in results.items():
        ca = per["ca"]
        for dec, r in per.items():
            cells = [L, dec]
            for key in ("train", "infer", "memory"):
                v = r.get(key)
                cells.append("-" if v is None else f"{v:.1f}")
            for key in ("train", "infer", "memory"):
                v, base = r.get(key), ca.get(key)
                cells.append("-" if v is None or not base else f"{v / base:.2f}x")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="Sequence lengths L.")
    p.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=DECODERS, help="Read-outs to compare.")
    p.add_argument("--batch", type=int, default=16, help="Batch size (paper benchmark: 16).")
    p.add_argument("--iters", type=int, default=5, help="Timed iterations per process (median is reported).")
    p.add_argument("--repeats", type=int, default=3, help="Fresh processes per measurement (median of medians).")
    p.add_argument("--train-max-len", type=int, default=1024, help="Skip training-step timing above this L.")
    p.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores).")
    p.add_argument("--out", default="bench_out", help="Directory for speed.json and speed.md.")
    p.add_argument("--worker", nargs=3, metavar=("DECODER", "L", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        dec, L, what = args.worker
        print(json.dumps(worker(dec, int(L), what, args.batch, args.iters, args.threads)))
        return
    results: dict = {}
    for L in args.lengths:
        results[L] = {}
        for dec in args.decoders:
            r: dict = {}
            whats = ["infer", "memory"] + (["train"] if L <= args.train_max_len else [])
            for what in whats:
                vals = [run(dec, L, what, args)["peak_mib" if what == "memory" else "ms"] for _ in range(args.repeats)]
                r[what] = statistics.median(vals)
                r[f"{what}_runs"] = vals
            results[L][dec] = r
            print(f"L={L} {dec}: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items() if not k.endswith("runs")),
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"batch": args.batch, "threads": args.threads, "iters": args.iters, "repeats": args.repeats,
            "model": "copy task, D=64, 4 heads, ff 128, emb depth 4, no encoder, b=2"}
    (out / "speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "speed.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
