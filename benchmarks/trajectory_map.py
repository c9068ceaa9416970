"""Exact trajectory map of T snapshots x P parameters on disk, against torch.mm; sketched map of 100k steps.

Usage: python benchmarks/trajectory_map.py [--T 2000] [--P 1000000] [--sketch-T 100000] [--budget-mb 512]
       [--block 512] [--dir DIR] [--keep] [--no-full-sketch-map] [--json] [--out FILE]

1. Writes a synthetic run (a float32 random walk, 4 tensors) of T snapshots of P parameters.
2. In a child process (for an honest peak RSS): the exact ``theta`` trajectory map by the streamed
   column-block Gram pass (``trajscope.measures.streaming.snapshot_grams``) and, in the same process,
   plain ``torch.mm`` on in-memory random data of the same block shapes (after the map, so that its
   buffers do not count in the map's peak memory).  ``flops_fraction`` = achieved FLOP/s of the map
   (all FLOPs of its mm calls / wall time, reading included) over the best torch.mm FLOP/s of 3.
   A second child computes the map of the first T/4 snapshots, to show that the peak memory does
   not grow with T.  A read-only pass (no products) times the disk share.
3. Sketched: a run of ``sketch-T`` steps of k=1024 sketches; times MDS (three variants), path
   statistics, PCA and the log-subsampled map as ``analyze`` computes them, and the full
   sketch-T x sketch-T cosine map in blocks (reduced to its MDS, checked against the O(T k) value).
The synthetic runs are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trajscope.store import Run


def shapes_for(P: int) -> dict[str, tuple[int, ...]]:
    rows = (P - 1000) // 2000
    return {"0.weight": (rows, 1000), "0.bias": (1000,), "1.weight": (rows, 1000),
            "1.bias": (P - 2 * rows * 1000 - 1000,)}


def make_snapshot_run(root: Path, T: int, P: int) -> str:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(P, generator=g)
    shapes = shapes_for(P)
    with Run.create(root, config={"benchmark": "trajectory_map", "T": T, "P": P}) as run:
        for t in range(T):
            named, off = {}, 0
            for name, shape in shapes.items():
                n = int(np.prod(shape))
                named[name] = theta[off:off + n].view(shape)
                off += n
            run.save_snapshot(t, named)
            theta.add_(torch.randn(P, generator=g), alpha=0.01)
        return str(run.path)


def block_shapes(n: int, block: int) -> list[tuple[int, int]]:
    """The (rows, rows) of every torch.mm that gram_accumulate_ issues for an (n, c) block."""
    return [(min(block, n - a), min(block, n - b)) for a in range(0, n, block) for b in range(a, n, block)]


def mm_reference(shapes, c: int, repeats: int = 2) -> float:
    """Best FLOP/s of plain torch.mm over ``shapes`` x c columns, random in-memory float32."""
    A, B = torch.randn(max(s[0] for s in shapes), c), torch.randn(max(s[1] for s in shapes), c)
    flops = sum(2 * a * b * c for a, b in shapes)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a, b in shapes:
            torch.mm(A[:a], B[:b].T)
        best = max(best, flops / (time.perf_counter() - t0))
    return best


def map_phase(path: str, limit: int, budget: int, block: int, read_pass: bool) -> dict:
    """Child process: the exact theta map of the first ``limit`` snapshots; FLOP/s vs torch.mm."""
    from trajscope.functional.gram import cosine_from_gram
    from trajscope.measures import Trajectory
    from trajscope.measures.streaming import block_columns, snapshot_grams
    from trajscope.measures.vectors import theta_gram

    traj = Trajectory.open(path)
    steps = traj.snapshot_steps[:limit]
    g = traj.groups("all")[0]
    n = len(steps)
    cols = block_columns(n, 1, budget)
    widths = [sum(p[4] for p in b) for b in traj.column_blocks(g, cols)]
    shapes = block_shapes(n, block)
    flops = sum(2 * a * b * c for c in widths for a, b in shapes)
    width = max(widths)  # all blocks but the last have (about) this width
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    C = cosine_from_gram(theta_gram(snapshot_grams(traj, g, steps, (), budget_bytes=budget, block=block)["ext"]))
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the reference allocates
    ref = mm_reference(shapes, width, repeats=3)
    out = {"n": n, "P": traj.numel(g), "column_blocks": len(widths), "columns": width, "block": block,
           "map_s": wall, "flops": flops, "achieved_gflops": flops / wall / 1e9, "mm_gflops": ref / 1e9,
           "mds_check": float(C[~torch.eye(n, dtype=torch.bool)].mean()),
           "peak_mem_mb": peak_mb, "baseline_mem_mb": base_mb}
    if read_pass:  # the same reads, no products: the disk's share of the wall time
        X = torch.empty(n, width)
        t0 = time.perf_counter()
        for pieces in traj.column_blocks(g, cols):
            for i, s in enumerate(steps):
                traj.read_pieces(int(s), pieces, X[i])
        out["read_only_s"] = time.perf_counter() - t0
    return out


def child(path: str, limit: int, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", "map", "--run", path, "--limit", str(limit),
           "--budget-mb", str(args.budget_mb), "--block", str(args.block)] + (["--read-pass"] if args.read_pass else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"map phase failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def sketch_phase(root: Path, T: int, k: int, full_map: bool) -> dict:
    from trajscope.functional.gram import mds_from_vectors
    from trajscope.measures import Trajectory, mds, path_statistics, trajectory_map, trajectory_pca

    S = torch.randn(T, k).cumsum(0).add_(20 * torch.randn(k))  # random walk in sketch space
    out = {"T": T, "k": k}
    t0 = time.perf_counter()
    with Run.create(root, config={"benchmark": "sketch_map", "T": T, "k": k}) as run:
        for t in range(T):
            run.log_sketch(t, S[t], k=k, seed=0)
    out["write_s"] = time.perf_counter() - t0
    traj = Trajectory.open(run.path)
    t0 = time.perf_counter()
    S = traj.sketch_matrix
    out["load_s"] = time.perf_counter() - t0
    timings = {}
    for v in ("theta", "displacement", "updates"):
        t0 = time.perf_counter()
        r = mds(traj, "all", v, exact=False)
        timings[f"mds_{v}_s"] = time.perf_counter() - t0
        out[f"mds_{v}"] = r.mds
    for name, fn in (("path_statistics_s", lambda: path_statistics(traj, exact=False)),
                     ("pca_s", lambda: trajectory_pca(traj, exact=False)),
                     ("map_subsampled_s", lambda: trajectory_map(traj, "all", exact=False))):
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
    out.update(timings)
    if full_map:  # every entry of the T x T map, in blocks, reduced to its off-diagonal mean
        U = S / S.norm(dim=1, keepdim=True)
        B, total, flops = 2048, 0.0, 0
        t0 = time.perf_counter()
        for a in range(0, T, B):
            for b in range(a, T, B):
                blk = torch.mm(U[a:a + B], U[b:b + B].T)
                s = float(blk.sum(dtype=torch.float64)) - (float(blk.diagonal().sum()) if a == b else 0.0)
                total += s if a == b else 2 * s
                flops += 2 * blk.shape[0] * blk.shape[1] * k
        out["full_map_s"] = time.perf_counter() - t0
        out["full_map_gflops"] = flops / out["full_map_s"] / 1e9
        out["full_map_mds"] = total / (T * (T - 1))
        out["mds_theta_from_vectors"] = mds_from_vectors(S)
    traj.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=2000)
    ap.add_argument("--P", type=int, default=1_000_000)
    ap.add_argument("--sketch-T", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--budget-mb", type=int, default=512)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--dir", default=None, help="where to write the synthetic runs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--read-pass", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--full-sketch-map", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "map":
        print(json.dumps(map_phase(args.run, args.limit, args.budget_mb << 20, args.block, args.read_pass)))
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="trajmap-"))
    need = args.T * args.P * 4 * 1.05
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    if need > free:
        raise SystemExit(f"needs {need / 1e9:.1f} GB of disk for the snapshots, {free / 1e9:.1f} GB free: "
                         "lower --T or --P")
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "T": args.T, "P": args.P,
           "budget_mb": args.budget_mb}
    try:
        t0 = time.perf_counter()
        path = make_snapshot_run(root / "snapshots", args.T, args.P)
        res["write_s"] = time.perf_counter() - t0
        full = child(path, args.T, args)
        small = child(path, max(2, args.T // 4), args)
        res.update(exact=full, exact_quarter_T=small, flops_fraction=full["achieved_gflops"] / full["mm_gflops"],
                   peak_mem_mb=full["peak_mem_mb"], peak_mem_mb_quarter_T=small["peak_mem_mb"])
        if args.sketch_T:
            res["sketched"] = sketch_phase(root / "sketches", args.sketch_T, args.k, args.full_sketch_map)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.json:
        print(json.dumps(res))
        return
    e = res["exact"]
    print(f"exact theta map, T={args.T} snapshots x P={e['P']:,} on disk ({args.T * e['P'] * 4 / 1e9:.1f} GB), "
          f"{e['column_blocks']} column blocks of {e['columns']:,}, row blocks of {e['block']}")
    print(f"  map {e['map_s']:.1f} s, {e['achieved_gflops']:.1f} GFLOP/s; torch.mm of the same shapes (best of 3) "
          f"{e['mm_gflops']:.1f} GFLOP/s -> flops_fraction {res['flops_fraction']:.2f}; "
          f"read-only pass {e.get('read_only_s', float('nan')):.1f} s")
    print(f"  peak RSS {res['peak_mem_mb']:.0f} MB (T/4: {res['peak_mem_mb_quarter_T']:.0f} MB; "
          f"after imports {e['baseline_mem_mb']:.0f} MB); snapshot writing took {res['write_s']:.0f} s")
    if "sketched" in res:
        s = res["sketched"]
        print(f"sketched, T={s['T']:,} steps, k={s['k']}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in s.items() if k.endswith("_s")))
        if "full_map_s" in s:
            print(f"  full {s['T']:,}^2 map {s['full_map_s']:.0f} s ({s['full_map_gflops']:.1f} GFLOP/s); "
                  f"MDS blocks {s['full_map_mds']:.6f} vs O(Tk) {s['mds_theta_from_vectors']:.6f}")


if __name__ == "__main__":
    main()
