"""Per-query time of greedy inference on a built recall tree, weights x backends alternated in one process.

``benchmarks/scale.py`` measures each configuration in its own run; on a noisy machine a comparison is only
fair within one process, in turns. This builds one tree of N tokens per checkpoint (the same context set for
all), warms every backend up (the compile backend compiles its query graph there), then times
``model.query`` on a batch of queries ``--repeats`` times in turns (every checkpoint on every backend in each
round) and reports the median microseconds per query of each pair.

    python benchmarks/query_speed.py --context-len 1048576 \\
        --tca results/scale/saved/recall-tca-zoom15-anneal/checkpoint.pt \\
        results/scale/saved/recall-tca-h1-zoom15-anneal/checkpoint.pt

One thread (``torch.set_num_threads(1)``), 16,384 queries, medians of 7 by default; pause other work first.
Set ``MALLOC_MMAP_THRESHOLD_=2147483648 MALLOC_TRIM_THRESHOLD_=4294967296`` as ``scale.py`` does for its workers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tca_env import backend


def measure(context_len: int, checkpoints: list[str], backends: list[str], repeats: int = 7,
            queries: int = 16384, seed: int | None = None) -> dict:
    """``{"<checkpoint> @ <backend>": {"median_us": .., "us": [..]}}`` plus the settings, as described above."""
    from scale import load  # benchmarks/ is the script's own folder

    torch.set_num_threads(1)
    models, task = {}, None
    for ck in checkpoints:
        models[ck], task = load("tca", ck, context_len)
    batch = task.sample(1, torch.Generator().manual_seed(context_len if seed is None else seed))
    xt = batch.xt[:, :queries]
    if xt.shape[1] < queries:
        raise SystemExit(f"--queries {queries}: the task's batch holds {xt.shape[1]}")
    times: dict[str, list[float]] = {}
    before = backend.backend()
    try:
        with torch.no_grad():
            trees = {ck: m.build(batch, lean=True) for ck, m in models.items()}
            for be in backends:  # warm-up (and compile)
                backend.set_backend(be)
                for ck, m in models.items():
                    m.query(trees[ck], xt)
            for _ in range(repeats):
                for be in backends:
                    backend.set_backend(be)
                    for ck, m in models.items():
                        t = time.perf_counter()
                        m.query(trees[ck], xt)
                        times.setdefault(f"{ck} @ {be}", []).append((time.perf_counter() - t) * 1e6 / xt.shape[1])
    finally:
        backend.set_backend(before)
    return {"context_len": context_len, "queries": xt.shape[1], "repeats": repeats,
            "results": {k: {"median_us": statistics.median(v), "us": v} for k, v in times.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context-len", type=int, default=2**20, help="N context tokens of the one tree per checkpoint.")
    p.add_argument("--tca", nargs="+", required=True, help="Trained recall tca checkpoints to compare.")
    p.add_argument("--backends", nargs="+", default=["torch", "compile"], choices=backend.BACKENDS,
                   help="Backends to alternate (tca_env.backend).")
    p.add_argument("--repeats", type=int, default=7, help="Timed rounds; each round times every pair once.")
    p.add_argument("--queries", type=int, default=16384, help="Queries per timed call.")
    p.add_argument("--json", help="Also write the results to this file.")
    a = p.parse_args(argv)
    if a.context_len < 2 or a.repeats < 1 or a.queries < 1:
        p.error("--context-len must be >= 2, --repeats and --queries >= 1")
    res = measure(a.context_len, a.tca, a.backends, a.repeats, a.queries)
    for k, v in res["results"].items():
        print(f"{v['median_us']:7.2f} us/query  {k}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
