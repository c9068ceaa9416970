"""Time ``Sketcher.sketch`` (k=1024) on CNN-like parameter lists of P = 100k, 1M, 10M elements.

Usage: python benchmarks/sketch_speed.py [--threads N]
Prints the best-of-repeats mean time per call (the index cache is built before timing).
"""

from __future__ import annotations

import argparse
import time

import torch

from trajscope.functional import Sketcher


def params(P: int) -> list[tuple[str, torch.Tensor]]:
    """~14 tensors like a small conv net (weights, norm scales/biases), scaled to P elements."""
    c = max(1, round((P / 94_986) ** 0.5 * 32))  # conv widths c, 2c, 4c
    shapes = [(c, 3, 3, 3), (c,), (c,), (c,), (2 * c, c, 3, 3), (2 * c,), (2 * c,), (2 * c,),
              (4 * c, 2 * c, 3, 3), (4 * c,), (4 * c,), (4 * c,), (10, 4 * c), (10,)]
    return [(f"layer{i}.p", torch.randn(s, requires_grad=True)) for i, s in enumerate(shapes)]


def bench(fn, reps: int, rounds: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, k=1024")
    for target in (100_000, 1_000_000, 10_000_000):
        named = params(target)
        P = sum(p.numel() for _, p in named)
        reps = max(2, 10_000_000 // P)
        cached, nocache = Sketcher(cache=True), Sketcher(cache=False)
        t0 = time.perf_counter()
        cached.sketch(named)
        first = time.perf_counter() - t0
        t_c = bench(lambda: cached.sketch(named), reps)
        t_n = bench(lambda: nocache.sketch(named), max(1, reps // 10), rounds=3)
        print(f"P={P:>10,d}  cached {t_c * 1e3:8.3f} ms ({t_c / P * 1e9:.2f} ns/elem)  "
              f"first call {first * 1e3:8.1f} ms  cache=False {t_n * 1e3:8.1f} ms  "
              f"cache {cached.cache_nbytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
