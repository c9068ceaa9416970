"""Top Hessian eigenvalue and Hessian trace: trajscope against PyHessian, same model, same batch.

Usage: .venv-peers/bin/python benchmarks/hessian.py [--json] [--repeats 5] [--threads 1] [--warmup 0]
[--clock cpu|wall] [--method auto] (a venv with trajscope and ``pyhessian`` installed: ``pip install torch==2.13.0
pyhessian -e .``). Clock: process CPU time by default (with one thread, the work done, not
inflated by other processes competing for the cores of a shared machine); ``--clock wall`` for
wall time.

Set-up per workload (mnist1d-mlp, mnist1d-cnn): the model from ``make_model`` (seed 0) after
``--warmup`` SGD steps (the workload's lr and momentum, batch 128), a fixed batch of the first 1,000
training examples, cross-entropy (mean over the batch), the model in eval mode for both tools
(PyHessian switches the model to eval mode itself; ours is called with ``train=False``, so BatchNorm
uses running statistics in both). Times include building the gradient graph (PyHessian's
constructor). Each timing is the median of ``--repeats`` interleaved runs, each with its own seed
(random start or probes), so it is the typical run; ``speedup_best`` (min over min) is in the JSON too.

- lambda_max: reference = our Lanczos in float64 by double backward to relative residual 1e-8
  (random start). Ours runs at its defaults except ``method=--method`` (default ``"auto"``: forward
  differences of gradients with the ReLU kinks frozen, one gradient per product instead of a double
  backward; :mod:`trajscope.functional.fd_hvp`): on this 1,000-example batch its start vector
  comes from 6 Lanczos steps on 128 random examples (``subset_start="auto"``; timed, not counted in
  ``hvps``, which are the full-batch products). Both tools get the same
  protocol: the tol (ours: Lanczos relative residual; PyHessian: relative change of its power
  iteration's estimate) is tightened along 1e-1, 3e-2, 1e-2, ... until every repeat is within 1e-3
  of the reference, and timed there; speedup = PyHessian time / our time. ``speedup_at_stated_tol``
  times ours at tol=1e-3 instead, which bounds the error by 1e-3 without looking at the reference.
- trace: on a narrow variant whose full Hessian is built (``width`` option, see NARROW), the exact
  trace sums e_i^T H e_i. Both estimators stop at the same relative standard error ``--trace-rtol``
  (stderr / |mean|, at least 10 samples): ours with ``deflate=--deflate`` Krylov steps, PyHessian's
  ``trace(maxIter=n, tol=0)`` with n the first sample count at which its own samples reach that
  standard error (found in a first run, then timed). rel_err / peer_rel_err vs the exact trace.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from trajscope import workloads
from trajscope.functional.hessian import hessian_trace, hessian_vector_product, top_hessian_eigenvalues

WORKLOADS = ("mnist1d-mlp", "mnist1d-cnn")
NARROW = {"mnist1d-mlp": {"width": 16}, "mnist1d-cnn": {"width": 4}}
RESULTS = Path(__file__).parent / "results"


def setup(name: str, options: dict, warmup: int, n: int = 1000):
    """(model in eval mode, cross-entropy, (x, y)) after ``warmup`` SGD steps from seed 0."""
    wl = workloads.get(name)
    data = wl.make_data(0, {})
    torch.manual_seed(0)
    model = wl.make_model(options)
    opt = torch.optim.SGD(model.parameters(), lr=wl.defaults["lr"], momentum=wl.defaults["momentum"])
    g = torch.Generator().manual_seed(0)
    for _ in range(warmup):
        idx = torch.randint(0, len(data.x_train), (128,), generator=g)
        opt.zero_grad()
        wl.loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), torch.nn.CrossEntropyLoss(), (data.x_train[:n], data.y_train[:n])


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCK["cpu"]


def timed(fn):
    t0 = clock()
    out = fn()
    return clock() - t0, out


TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)


METHOD = "auto"  # our product for lambda_max (--method)


def ours_lambda(model, crit, batch, seed, tol):
    """(value, Hessian-vector products)."""
    g = torch.Generator().manual_seed(seed)
    e = top_hessian_eigenvalues(model, crit, batch, tol=tol, max_iter=300, generator=g, train=False,
                                method=METHOD)
    return float(e.values[0]), e.n_iter


def counting_pyhessian():
    """PyHessian's ``hessian`` class, with its module's product function wrapped to count calls."""
    import pyhessian  # noqa: F401  (the package rebinds the name pyhessian.hessian to the class)

    ph = sys.modules["pyhessian.hessian"]
    if not hasattr(ph, "_calls"):
        ph._calls, inner = [0], ph.hessian_vector_product

        def counted(*a, **k):
            ph._calls[0] += 1
            return inner(*a, **k)

        ph.hessian_vector_product = counted
    return ph.hessian, ph._calls


def peer_lambda(model, crit, batch, seed, tol):
    """(value, Hessian-vector products) of PyHessian's power iteration."""
    hessian, calls = counting_pyhessian()
    torch.manual_seed(seed)
    calls[0] = 0
    h = hessian(model, crit, data=batch, cuda=False)
    value = h.eigenvalues(maxIter=10_000, tol=tol, top_n=1)[0][0]
    model.zero_grad(set_to_none=True)  # PyHessian leaves the graph in p.grad
    return value, calls[0]


def loosest(fn, ref: float, repeats: int) -> tuple[float | None, list]:
    """The loosest tol in TOLS at which every repeat (seed) is within 1e-3 of ``ref``, and its runs."""
    runs: list = []
    for tol in TOLS:
        runs = [fn(s, tol) for s in range(repeats)]
        if all(abs(v - ref) <= 1e-3 * abs(ref) for v, _ in runs):
            return tol, runs
    return None, runs


def bench_lambda(model, crit, batch, repeats: int) -> dict:
    m64 = copy.deepcopy(model).double()
    ref = float(top_hessian_eigenvalues(m64, crit, (batch[0].double(), batch[1]), tol=1e-8, max_iter=500,
                                        train=False, subset_start=None).values[0])
    tol, ours = loosest(lambda s, t: ours_lambda(model, crit, batch, s, t), ref, repeats)
    peer_tol, peer = loosest(lambda s, t: peer_lambda(model, crit, batch, 100 + s, t), ref, repeats)
    t_ours, t_peer, t_stated, stated = [], [], [], []
    for s in range(repeats):  # timings interleaved, at the tolerances found
        t_ours.append(timed(lambda: ours_lambda(model, crit, batch, s, tol or TOLS[-1]))[0])
        t_peer.append(timed(lambda: peer_lambda(model, crit, batch, 100 + s, peer_tol or TOLS[-1]))[0])
        t, out = timed(lambda: ours_lambda(model, crit, batch, s, 1e-3))
        t_stated.append(t)
        stated.append(out)
    err = lambda runs: max(abs(v - ref) / abs(ref) for v, _ in runs)  # noqa: E731
    med = statistics.median
    return {"speedup": med(t_peer) / med(t_ours), "rel_err": err(ours), "peer_rel_err": err(peer),
            "reference": ref, "ours_s": med(t_ours), "peer_s": med(t_peer),
            "speedup_best": min(t_peer) / min(t_ours),
            "tol": tol, "peer_tol": peer_tol, "hvps": [n for _, n in ours], "peer_hvps": [n for _, n in peer],
            "speedup_at_stated_tol": med(t_peer) / med(t_stated), "stated_tol_rel_err": err(stated),
            "stated_tol_hvps": [n for _, n in stated]}


def exact_trace(model, crit, batch) -> float:
    """sum_i e_i^T H e_i in float64, one Hessian-vector product per parameter."""
    m64 = copy.deepcopy(model).double()
    b64 = (batch[0].double(), batch[1])
    P = sum(p.numel() for p in m64.parameters())
    total = 0.0
    for i in range(P):
        e = torch.zeros(P, dtype=torch.float64)
        e[i] = 1.0
        total += float(hessian_vector_product(m64, crit, b64, e, train=False)[i])
    return total


def peer_trace_samples(model, crit, batch, seed, n):
    hessian, _ = counting_pyhessian()
    torch.manual_seed(seed)
    h = hessian(model, crit, data=batch, cuda=False)
    samples = h.trace(maxIter=n, tol=0.0)  # tol=0: exactly n samples
    model.zero_grad(set_to_none=True)
    return samples


def samples_needed(samples: list[float], rtol: float, min_samples: int = 10) -> int:
    """The first n >= min_samples with stderr / |mean| < rtol (the same rule as ours), else len."""
    s = torch.tensor(samples, dtype=torch.float64)
    for n in range(min_samples, len(s) + 1):
        head = s[:n]
        if float(head.std() / n ** 0.5) < rtol * abs(float(head.mean())):
            return n
    return len(s)


def bench_trace(model, crit, batch, repeats: int, rtol: float, deflate: int, max_samples: int) -> dict:
    exact = exact_trace(model, crit, batch)
    ours, peer, ns = [], [], []
    for s in range(repeats):
        g = torch.Generator().manual_seed(s)
        ours.append(timed(lambda: hessian_trace(model, crit, batch, rtol=rtol, max_samples=max_samples,
                                                deflate=deflate, generator=g, train=False)))
        n = samples_needed(peer_trace_samples(model, crit, batch, 100 + s, max_samples), rtol)
        ns.append(n)
        peer.append(timed(lambda: peer_trace_samples(model, crit, batch, 100 + s, n)))
    t_ours, t_peer = statistics.median(t for t, _ in ours), statistics.median(t for t, _ in peer)
    return {"speedup": t_peer / t_ours,
            "speedup_best": min(t for t, _ in peer) / min(t for t, _ in ours),
            "rel_err": statistics.median(abs(e.mean - exact) / abs(exact) for _, e in ours),
            "peer_rel_err": statistics.median(abs(statistics.fmean(v) - exact) / abs(exact) for _, v in peer),
            "exact": exact, "ours_s": t_ours, "peer_s": t_peer, "rtol": rtol, "deflate": deflate,
            "ours_matvecs": [e.n_matvec for _, e in ours], "peer_samples": ns,
            "ours_rel_stderr": [e.stderr / abs(e.mean) for _, e in ours]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0, help="SGD steps before measuring")
    ap.add_argument("--trace-rtol", type=float, default=0.02)
    ap.add_argument("--deflate", type=int, default=32)
    ap.add_argument("--max-samples", type=int, default=2000)
    ap.add_argument("--clock", choices=tuple(CLOCK), default="cpu",
                    help="process CPU time (default; not inflated by other processes on a shared machine) or wall")
    ap.add_argument("--method", default="auto",
                    help="our product for lambda_max: auto (finite differences, kinks frozen; default), "
                         "double-backward, ...")
    args = ap.parse_args()
    global clock, METHOD
    clock, METHOD = CLOCK[args.clock], args.method
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")  # PyHessian's
    out = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "clock": args.clock,
           "warmup_steps": args.warmup, "batch": 1000, "method": args.method, "models": {}}
    try:
        import pyhessian  # noqa: F401
    except ImportError as e:
        out["error"] = f"pyhessian not installed: {e}"
    for name in WORKLOADS:
        if "error" in out:
            break
        entry = {}
        model, crit, batch = setup(name, {}, args.warmup)
        entry["lambda_max"] = bench_lambda(model, crit, batch, args.repeats)
        model, crit, batch = setup(name, NARROW[name], args.warmup)
        entry["trace"] = bench_trace(model, crit, batch, args.repeats, args.trace_rtol, args.deflate,
                                     args.max_samples)
        entry["trace"]["options"] = NARROW[name]
        out["models"][name] = entry
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"hessian-warmup{args.warmup}.json").write_text(json.dumps(out, indent=2))
    if args.json:
        print(json.dumps(out))
        return
    print(f"torch {out['torch']}, {args.threads} thread(s), batch 1000, median of {args.repeats}, "
          f"{args.warmup} SGD steps before measuring")
    print(f"{'model':<13} {'quantity':<10} {'ours s':>8} {'peer s':>8} {'speedup':>8} {'rel_err':>9} {'peer_err':>9}")
    for name, entry in out["models"].items():
        for q, r in entry.items():
            print(f"{name:<13} {q:<10} {r['ours_s']:8.3f} {r['peer_s']:8.3f} {r['speedup']:8.2f} "
                  f"{r['rel_err']:9.2e} {r['peer_rel_err']:9.2e}")
    if "error" in out:
        print(out["error"])


if __name__ == "__main__":
    main()
