"""Tree Cross Attention at long contexts: N = 2^10 ... 2^20 context tokens on one CPU thread.

For each N, in fresh processes (so peak memory is the measured work's alone), on the recall task (a context
of N key-value pairs, D = 64, b = 2, no context encoder):

* **build**: time to embed the N tokens, order them (k-d), aggregate the tree and project every node's and
  token's keys and values, and its peak resident memory above the process's size just before it;
* **tca per query**: greedy retrieval + read-out + head per query, on the built tree (a batch of 16,384
  queries; the tree is built once and queried many times);
* **ca per query**: full cross attention over all N tokens (fused SDPA, queries in chunks), per query;
  measured up to ``--ca-max-log2`` and fitted (linear in N) beyond;
* **end to end**: build + M queries, for M = 1,024 and M = N/2 (ca's where its estimate exceeds a minute is
  fitted: its projection time plus M times its per-query time);
* **accuracy**: recall accuracy of trained tca, ca and perceiver weights (``--tca`` etc.: checkpoints
  trained at N <= 4,096) at every N, on ``--acc-queries`` queries of one context set;
* **env**: ``--env`` steps ``gym.make_vec("TreeRetrieval-v0", num_envs=16384, task="recall", ...)`` over one
  2^``--env-log2``-token tree and reports query-steps per second (after the build).

Writes ``scale.json``, ``scale.md`` and ``scale.png`` (time and memory against N, log-log) to ``--out``.

    python benchmarks/scale.py --tca runs/recall-tca/checkpoint.pt --ca runs/recall-ca/checkpoint.pt \\
        --perceiver runs/recall-perceiver/checkpoint.pt --env
    python benchmarks/scale.py --max-log2 14        # a quick look, fresh (untrained) weights
    python benchmarks/scale.py --replot             # redraw from scale.json

Timings are medians of ``--repeats``; the machine is noisy, so compare within one run. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUERY_BATCH = 16_384


# ------------------------------------------------------------------------------------------ worker side

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's peak resident size of this process (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def load(decoder: str, checkpoint: str | None, n: int):
    """A recall model (trained weights from ``checkpoint`` or fresh ones) and the recall task at exactly N."""
    import torch

    from tca_env.checkpoint import load_predictor, task_of
    from tca_env.model import ModelConfig, ReTreever
    from tca_env.tasks import make_task
    from tca_env.tasks.recall import RecallTask

    if checkpoint:
        model, ckpt = load_predictor(checkpoint, "cpu")
        name, opts = task_of(ckpt)
        if name != "recall":
            raise SystemExit(f"{checkpoint} was trained on task {name!r}, not recall")
        if model.cfg.decoder != decoder:
            raise SystemExit(f"{checkpoint} holds a {model.cfg.decoder} model, given as --{decoder}")
        # Exactly N in the unit cube: the task's size and training-distribution options (variable N, zoom) dropped.
        opts = {k: v for k, v in opts.items() if k not in RecallTask.size_options}
    else:
        opts = {}
        task0 = make_task("recall", context_len=4096)
        torch.manual_seed(0)
        model = ReTreever(ModelConfig.for_task(task0, decoder=decoder))
    task = make_task("recall", context_len=n, num_queries=QUERY_BATCH, **opts)
    return model.eval(), task


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def work_tca(n: int, checkpoint: str | None, repeats: int) -> dict:
    """Build time and peak memory, per-query greedy time, end to end for M = 1,024 and N/2, accuracy."""
    import torch

    from tca_env import backend
    from tca_env import search as S
    from tca_env.tasks import Batch

    model, task = load("tca", checkpoint, n)
    batch = task.sample(1, torch.Generator().manual_seed(n))
    out: dict = {"n": n, "backend": backend.backend(), "matmul": backend.matmul_route()}
    with torch.no_grad():
        if out["backend"] == "compile" and n > model.build_unchunked_max:
            # Compile the aggregator's chunk graph on a smaller chunked build first: the timings and the peak
            # memory are the build's, not the compiler's (its one-off time is reported as compile_s).
            m = 2 * model.build_unchunked_max
            t = time.perf_counter()
            model.build(Batch(batch.xc[:, :m], batch.yc[:, :m], batch.xt[:, :1], batch.yt[:, :1]), lean=True)
            out["compile_s"] = time.perf_counter() - t
        backend.matmul_route()  # its one-off probe (~0.1 s, a few MiB) is not the build's
        can_reset = reset_peak()
        before = rss_bytes()
        t = time.perf_counter()
        ctx = model.build(batch, lean=True)
        out["build_first_s"] = out["build_s"] = time.perf_counter() - t
        if can_reset:
            out["build_peak_mib"] = (peak_bytes() - before) / 2**20
        out["tree_mib"] = (rss_bytes() - before) / 2**20
        # Warm-up with every query count timed below (the whole batch; the end-to-end runs' chunks), so that on the
        # compile backend no timing includes compiling the query graph (its one-off time: query_compile_s). Before
        # the repeated builds: a build right after compiling faults its tables in afresh, like a first build.
        cols = S.chunk_columns(batch.B)
        t = time.perf_counter()
        for size in sorted({batch.M, *(r for m in (1024, n // 2) for r in (min(m, cols), m % cols) if r)}):
            model.query(ctx, batch.xt[:, :size])
        out["query_compile_s"] = time.perf_counter() - t
        # The first build faults every page of its tables in fresh (~0.4 s per GiB here). Later builds, each
        # made after the previous tree is freed (as when one tree replaces another), reuse those pages where
        # malloc keeps them (--malloc tuned): build_s is their median, build_first_s the first build.
        if repeats > 1:
            del ctx
            times = []
            for _ in range(repeats - 1):
                t = time.perf_counter()
                ctx = model.build(batch, lean=True)
                times.append(time.perf_counter() - t)
                del ctx
            out["build_s"] = statistics.median(times)
            ctx = model.build(batch, lean=True)
        sec, pred = timed(functools.partial(model.query, ctx, batch.xt), repeats)
        out["query_us"] = 1e6 * sec / batch.M
        out["accuracy"] = float((pred.argmax(-1) == batch.yt).float().mean())
        del ctx, pred  # end to end like build_s: each tree built once the previous one is freed
        out["end_to_end_s"] = {}
        for label, m in (("1024", 1024), ("half", n // 2)):
            sub = Batch(batch.xc, batch.yc, batch.xt[:, :1], batch.yt[:, :1])
            xt = batch.xc[:, torch.randperm(n, generator=torch.Generator().manual_seed(1))[:m]]
            t = time.perf_counter()
            c = model.build(sub, lean=True)
            model.query(c, xt)
            out["end_to_end_s"][label] = time.perf_counter() - t
            del c
    return out


def work_ca(n: int, checkpoint: str | None, repeats: int, max_queries: int, decoder: str = "ca") -> dict:
    """Full cross attention (or Perceiver IO): projection time, per-query time, accuracy on one context set."""
    import torch

    model, task = load(decoder, checkpoint, n)
    batch = task.sample(1, torch.Generator().manual_seed(n))
    # ca reads all N keys per query: keep each timing to a few seconds (at least 16 queries).
    m = max(16, min(max_queries, 2**26 // n))
    xt, yt = batch.xt[:, :m], batch.yt[:, :m]
    out: dict = {"n": n, "queries": m}
    with torch.no_grad():
        t = time.perf_counter()
        ctx = model.build(batch, lean=True)
        out["build_s"] = time.perf_counter() - t
        model.query(ctx, xt[:, :4])  # warm-up
        sec, pred = timed(lambda: model.query(ctx, xt), repeats)
        out["query_us"] = 1e6 * sec / m
        out["accuracy"] = float((pred.argmax(-1) == yt).float().mean())
    return out


def work_env(n: int, checkpoint: str | None, num_envs: int, rounds: int, array_type: str) -> dict:
    """Query-steps per second of the vector env over one built tree of N tokens."""
    import gymnasium as gym
    import numpy as np
    import torch

    import tca_env  # noqa: F401 - registers the env

    predictor = checkpoint or "fresh"
    # One round more than timed: the step that ends a tree's last round samples and builds the next tree.
    opts = {"context_len": n, "num_queries": num_envs * (rounds + 1)}
    t = time.perf_counter()
    env = gym.make_vec("TreeRetrieval-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                       task="recall", task_options=opts, predictor=predictor, array_type=array_type)
    make_s = time.perf_counter() - t
    t = time.perf_counter()
    obs, _ = env.reset(seed=0)
    build_s = time.perf_counter() - t
    k = env.unwrapped.queries.k
    rng = np.random.default_rng(0)
    steps, correct, t = 0, 0.0, time.perf_counter()
    for _ in range(rounds):
        for _ in range(k):
            # A greedy agent would need the policy's forward; random actions time the env itself.
            acts = rng.integers(0, 2, num_envs)
            obs, reward, term, trunc, info = env.step(acts if array_type == "numpy" else torch.as_tensor(acts))
            steps += num_envs
        correct += float(np.asarray(reward).mean())
    sec = time.perf_counter() - t
    env.close()
    return {"n": n, "num_envs": num_envs, "rounds": rounds, "depth": k, "make_s": make_s, "build_s": build_s,
            "query_steps_per_s": steps / sec, "seconds": sec, "array_type": array_type,
            "random_policy_reward": correct / rounds}


# ------------------------------------------------------------------------------------------ driver side

#: glibc malloc settings of ``--malloc tuned``: serve allocations up to 2 GiB from the heap and keep up to
#: 4 GiB of freed heap. With glibc's defaults, chunk temporaries of several MiB are mapped fresh and returned to
#: the system, then faulted in again (~600,000 page faults per 2^20 aggregated rows; worth 0.3-0.4 s of the
#: 2^20 build), and so are the tree's 0.5 GiB key and value tables at every build. Served from the heap, a
#: build that follows a freed tree reuses its pages: at 2^20 (compile backend, build + 1,024 queries, two
#: alternations in fresh processes) 4.94-5.06 s against 5.34 s with the earlier 256 MiB / 1 GiB thresholds.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**31), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def run_worker(args: list[str], timeout: float, malloc: str = "tuned", backend: str = "torch") -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TCA_BACKEND": backend,
           **(TUNED_MALLOC if malloc == "tuned" else {})}
    cmd = [sys.executable, __file__, "--worker", *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s: {' '.join(args)}", flush=True)
        return None
    if p.returncode != 0:
        print(f"  failed: {' '.join(args)}\n{p.stderr[-2000:]}", flush=True)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def fit_linear(points: list[tuple[int, float]]) -> float:
    """Slope a of t = a * N through the origin (least squares on the largest half of the points)."""
    pts = sorted(points)[len(points) // 2:]
    return sum(n * t for n, t in pts) / sum(n * n for n, _ in pts)


def summarise(res: dict) -> dict:
    """Add ca's fitted per-query times, end-to-end estimates and the ratios to tca."""
    ca = {r["n"]: r for r in res["ca"]}
    slope = fit_linear([(n, r["query_us"]) for n, r in ca.items()]) if ca else None
    build_slope = fit_linear([(n, r["build_s"]) for n, r in ca.items()]) if ca else None
    rows = []
    for r in res["tca"]:
        n = r["n"]
        row = {"n": n, **{k: r.get(k) for k in ("build_s", "build_first_s", "build_peak_mib", "tree_mib", "query_us")},
               "tca_accuracy": r.get("accuracy"), "tca_e2e_1024_s": r["end_to_end_s"]["1024"],
               "tca_e2e_half_s": r["end_to_end_s"]["half"]}
        if n in ca:
            row.update(ca_query_us=ca[n]["query_us"], ca_measured=True, ca_accuracy=ca[n].get("accuracy"),
                       ca_build_s=ca[n]["build_s"])
        elif slope is not None:
            row.update(ca_query_us=slope * n, ca_measured=False, ca_build_s=build_slope * n)
        if row.get("ca_query_us"):
            row["ca_over_tca_query"] = row["ca_query_us"] / r["query_us"]
            row["ca_e2e_1024_s"] = row["ca_build_s"] + 1024 * row["ca_query_us"] * 1e-6
            row["ca_e2e_half_s"] = row["ca_build_s"] + n // 2 * row["ca_query_us"] * 1e-6
        rows.append(row)
    for r in res.get("perceiver", []):
        for row in rows:
            if row["n"] == r["n"]:
                row["perceiver_accuracy"] = r.get("accuracy")
    res["table"] = rows
    res["ca_fit_us_per_token"] = slope
    return res


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def markdown(res: dict) -> str:
    lines = [
        "# Tree Cross Attention at long contexts (recall task, one CPU thread)", "",
        f"D = 64, b = 2, no context encoder; per-query times over a batch of {QUERY_BATCH:,} queries on a built "
        "tree; ca = full cross attention (fused SDPA) over all N tokens, *italic* where fitted (linear in N). "
        "End to end = build + M queries: measured for tca; for ca, its measured embedding + projection time plus "
        "M times its per-query time. Accuracy: trained weights (see the checkpoints below), one context set per N. "
        "Build: the median of the builds after the first, each made once the previous tree is freed (its pages "
        "reused); in parentheses the first build of the process, which faults every page in fresh.",
        "",
        "| N | build (s) | build peak (MiB) | tca per query (us) | ca per query (us) | ca / tca | "
        "e2e M=1,024 tca / ca (s) | e2e M=N/2 tca / ca (s) | acc tca | acc ca | acc perceiver |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def first(r: dict) -> str:
        return f" ({r['build_first_s']:.2f})" if r.get("build_first_s") is not None else ""

    for r in res["table"]:
        it = (lambda s: s) if r.get("ca_measured", True) else (lambda s: f"*{s}*")
        ca_q = it(fmt(r.get("ca_query_us"), ",.0f"))
        pct = lambda x: fmt(None if x is None else 100 * x, ".1f")  # noqa: E731
        lines.append(
            f"| 2^{r['n'].bit_length() - 1} | {r['build_s']:.2f}{first(r)} | {fmt(r.get('build_peak_mib'), ',.0f')} | "
            f"{r['query_us']:.2f} | {ca_q} | {fmt(r.get('ca_over_tca_query'), ',.0f')} | "
            f"{r['tca_e2e_1024_s']:.2f} / {it(fmt(r.get('ca_e2e_1024_s'), ',.2f'))} | "
            f"{r['tca_e2e_half_s']:.2f} / {it(fmt(r.get('ca_e2e_half_s'), ',.1f'))} | "
            f"{pct(r.get('tca_accuracy'))} | {pct(r.get('ca_accuracy'))} | {pct(r.get('perceiver_accuracy'))} |")
    if res.get("env"):
        e = res["env"]
        lines += ["", f"Vector env: {e['num_envs']:,} parallel queries descending one tree of "
                  f"2^{e['n'].bit_length() - 1} tokens (depth {e['depth']}, {e['rounds']} rounds, "
                  f"{e['array_type']} arrays): **{e['query_steps_per_s']:,.0f} query-steps/s** after a "
                  f"{e['build_s']:.1f} s reset (sampling + build)."]
    lines += ["", f"Checkpoints: {res.get('checkpoints')}. Command: `{res.get('command')}`."]
    if res.get("tca_command"):
        lines += ["", f"The tca columns (build, per query, end to end, accuracy) were measured again later with "
                  f"`{res['tca_command']}` (backend {res.get('tca_backend', 'torch')}; glibc malloc: "
                  f"{res.get('tca_malloc', 'default')}; the other columns: {res.get('malloc', 'default')})."]
    compiled = [r for r in res["tca"] if r.get("compile_s")]
    if compiled:
        lines += ["", "Compiling the aggregator's chunk graph took " + ", ".join(
            f"{r['compile_s']:.1f} s (2^{r['n'].bit_length() - 1})" for r in compiled) + " before the timed builds."]
    if any(r.get("backend") == "compile" for r in res["tca"]):
        lines += ["", "Compiling the query graphs (the warm-up before the timed queries, every query count timed) took "
                  + ", ".join(f"{r['query_compile_s']:.1f} s (2^{r['n'].bit_length() - 1})" for r in res["tca"]
                              if r.get("backend") == "compile" and "query_compile_s" in r) + "."]
    if res.get("env_command"):
        lines += ["", f"The env row was measured again later with `{res['env_command']}`."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["table"]
    n = [r["n"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.loglog(n, [r["build_s"] for r in rows], "o-", label="tca: build the tree (s)")
    a.loglog(n, [r["query_us"] * 1e-6 for r in rows], "s-", label="tca: per query (s)")
    meas = [r for r in rows if r.get("ca_measured")]
    fit = [r for r in rows if r.get("ca_query_us") and not r.get("ca_measured")]
    a.loglog([r["n"] for r in meas], [r["ca_query_us"] * 1e-6 for r in meas], "^-", label="ca: per query (s)")
    if fit:
        a.loglog([r["n"] for r in fit], [r["ca_query_us"] * 1e-6 for r in fit], "^:", label="ca: per query, fitted")
    a.loglog(n, [r["tca_e2e_half_s"] for r in rows], "d-", label="tca: build + N/2 queries (s)")
    ca_half = [r for r in rows if r.get("ca_e2e_half_s")]
    a.loglog([r["n"] for r in ca_half], [r["ca_e2e_half_s"] for r in ca_half], "d:",
             label="ca: N/2 queries (s)")
    mem = [r for r in rows if r.get("build_peak_mib") is not None]
    b.loglog([r["n"] for r in mem], [r["build_peak_mib"] for r in mem], "o-", label="tca build: peak above idle")
    b.loglog([r["n"] for r in mem], [r["n"] * 4 * 64 * 4 / 2**20 for r in mem], "k:",
             label="2N rows of keys + values (float32)")
    for ax, unit, title in ((a, "seconds", "time (one CPU thread)"), (b, "MiB", "memory")):
        ax.set_xlabel("context tokens N")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-log2", type=int, default=10, help="Smallest N = 2^min_log2 (default 10).")
    p.add_argument("--max-log2", type=int, default=20, help="Largest N = 2^max_log2 (default 20).")
    p.add_argument("--ca-max-log2", type=int, default=20, help="Largest N at which ca is measured; fitted beyond.")
    p.add_argument("--tca", default=None, help="Recall checkpoint of the tca model (default: fresh weights).")
    p.add_argument("--ca", default=None, help="Recall checkpoint of the ca model (default: fresh weights).")
    p.add_argument("--perceiver", default=None, help="Recall checkpoint of the perceiver model (accuracy only).")
    p.add_argument("--acc-queries", type=int, default=1024, help="Queries for ca / perceiver accuracy and timing.")
    p.add_argument("--repeats", type=int, default=3, help="Timing repeats per measurement (median).")
    p.add_argument("--env", action="store_true", help="Also measure the vector env's throughput.")
    p.add_argument("--env-log2", type=int, default=20, help="Tree size of the env measurement (default 2^20).")
    p.add_argument("--env-rounds", type=int, default=4, help="Rounds of 16,384 episodes over the env's tree.")
    p.add_argument("--timeout", type=float, default=900, help="Seconds per worker process before it is abandoned.")
    p.add_argument("--out", default="bench_out", help="Output directory (default bench_out).")
    p.add_argument("--replot", action="store_true", help="Redraw scale.md / scale.png from scale.json.")
    p.add_argument("--env-only", action="store_true", help="Measure only the env (with --env settings) and update "
                   "its entry in an existing scale.json.")
    p.add_argument("--tca-only", action="store_true", help="Measure only tca (build, per query, end to end, "
                   "accuracy) at every N in range and replace those entries in an existing scale.json (the rest kept).")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="glibc malloc of the worker processes: 'tuned' (default) keeps freed memory for reuse "
                   "(MALLOC_MMAP_THRESHOLD_=2^31, MALLOC_TRIM_THRESHOLD_=2^32), 'default' leaves glibc's settings.")
    p.add_argument("--backend", choices=("torch", "compile"), default="torch",
                   help="Backend of the tca workers (TCA_BACKEND): 'torch' (default, eager) or 'compile' (the tree's "
                   "aggregator chunks through torch.compile; compiled on a smaller build first, reported as "
                   "compile_s).")
    p.add_argument("--matmul", choices=("auto", "onednn", "default"), default="auto",
                   help="Route of the workers' float32 matrix products (TCA_MATMUL, tca_env.backend): 'auto' (default: "
                   "oneDNN where a probe finds it exact and faster than the BLAS), 'onednn' or 'default' (the BLAS).")
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        import torch

        torch.set_num_threads(1)
        kind, n, ckpt = args.worker[0], int(args.worker[1]), args.worker[2] or None
        if kind == "tca":
            out = work_tca(n, ckpt, args.repeats)
        elif kind in ("ca", "perceiver"):
            out = work_ca(n, ckpt, args.repeats, args.acc_queries, kind)
        else:
            out = work_env(n, ckpt, QUERY_BATCH, args.env_rounds, "numpy")
        print(json.dumps(out))
        return 0

    os.environ["TCA_MATMUL"] = args.matmul  # the route of every worker (they inherit the environment)

    def measure_tca(n: int) -> dict | None:
        r = run_worker(["tca", str(n), args.tca or "", "--repeats", str(args.repeats)], args.timeout, args.malloc,
                       args.backend)
        if r:
            print(f"  tca ({r['backend']}, {r.get('matmul', 'default')} matmuls): build {r['build_s']:.2f} s, "
                  f"peak {r.get('build_peak_mib', 0):.0f} MiB, "
                  f"{r['query_us']:.2f} us/query, accuracy {r['accuracy']:.3f}", flush=True)
        return r

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot or args.env_only or args.tca_only:
        res = json.loads((out_dir / "scale.json").read_text())
        if args.tca_only:
            res["tca"] = [r for r in res["tca"] if not args.min_log2 <= r["n"].bit_length() - 1 <= args.max_log2]
            res["checkpoints"]["tca"] = args.tca
            res["tca_malloc"] = args.malloc
            res["tca_backend"] = args.backend
            res["tca_matmul"] = args.matmul
            res["tca_command"] = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
            for lg in range(args.min_log2, args.max_log2 + 1):
                print(f"N = 2^{lg}", flush=True)
                if r := measure_tca(2**lg):
                    res["tca"].append(r)
            res["tca"].sort(key=lambda e: e["n"])
        if args.env_only:
            n = 2**args.env_log2
            res["env"] = run_worker(["env", str(n), args.tca or "", "--env-rounds", str(args.env_rounds)], args.timeout,
                                    args.malloc)
            res["env_command"] = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
            print(f"  {res['env']['query_steps_per_s']:,.0f} query-steps/s", flush=True)
    else:
        res = {"tca": [], "ca": [], "perceiver": [], "env": None, "malloc": args.malloc, "tca_backend": args.backend,
               "tca_matmul": args.matmul,
               "checkpoints": {"tca": args.tca, "ca": args.ca, "perceiver": args.perceiver},
               "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        for lg in range(args.min_log2, args.max_log2 + 1):
            n = 2**lg
            print(f"N = 2^{lg}", flush=True)
            if r := measure_tca(n):
                res["tca"].append(r)
            if lg <= args.ca_max_log2:
                r = run_worker(["ca", str(n), args.ca or "", "--repeats", str(args.repeats), "--acc-queries",
                                str(args.acc_queries)], args.timeout, args.malloc)
                if r:
                    res["ca"].append(r)
                    print(f"  ca: {r['query_us']:.1f} us/query, accuracy {r['accuracy']:.3f}", flush=True)
            if args.perceiver:
                r = run_worker(["perceiver", str(n), args.perceiver, "--repeats", "1", "--acc-queries",
                                str(args.acc_queries)], args.timeout, args.malloc)
                if r:
                    res["perceiver"].append(r)
                    print(f"  perceiver: accuracy {r['accuracy']:.3f}", flush=True)
            (out_dir / "scale.json").write_text(json.dumps(res, indent=1))
        if args.env:
            n = 2**args.env_log2
            print(f"env: {QUERY_BATCH} envs over 2^{args.env_log2} tokens", flush=True)
            res["env"] = run_worker(["env", str(n), args.tca or "", "--env-rounds", str(args.env_rounds)],
                                    args.timeout, args.malloc)
            if res["env"]:
                print(f"  {res['env']['query_steps_per_s']:,.0f} query-steps/s", flush=True)
    res = summarise(res)
    (out_dir / "scale.json").write_text(json.dumps(res, indent=1))
    (out_dir / "scale.md").write_text(markdown(res))
    plot(res, out_dir / "scale.png")
    print((out_dir / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
