"""Run many configs into one store: the executor behind ``tune``, ``study`` and any sweep.

``run_configs(configs, root, executor="local", jobs=N)`` trains each :class:`RunConfig` with the
reference :class:`~trajscope.train.Trainer` and returns one summary per config, in order. Runs are
cached by config hash: a config whose run already finished is not trained again. A failed run is
reported in its summary (``status`` ``failed`` with the ``error``) and does not stop the others.

Executors: ``local`` (the default) trains in this process when ``jobs`` is 1, else in ``jobs``
worker processes; ``ray`` runs each config as a Ray Tune trial (optional extra ``ray``;
``address`` names an existing cluster). Every worker writes its own run directory under ``root``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from trajscope.config import RunConfig
from trajscope.errors import TrajscopeError, UsageError, unknown_choice

EXECUTORS = ("local", "ray")


def train_one(config: dict[str, Any] | RunConfig, root: str | None, threads: int | None = None) -> dict[str, Any]:
    """Train one config (a RunConfig or its JSON dump) and return its summary; never raises for a
    failed run (the error goes into the summary)."""
    import torch

    from trajscope.train import Trainer

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = config if isinstance(config, RunConfig) else RunConfig(**config)
    try:
        status = existing_status(cfg, root)
        if status in ("finished", "diverged"):  # a result already: reuse it (divergence is a result)
            return cached_summary(cfg, root)
        # A crashed (killed) run continues from its last checkpoint; a new one starts.
        return Trainer(cfg, root=root, progress=False, resume=status is not None).fit()
    except TrajscopeError as e:
        return {"status": "failed", "error": str(e), "workload": cfg.workload}
    except Exception as e:  # a bug or a resource error in one run must not stop the sweep
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "workload": cfg.workload}


def existing_status(cfg: RunConfig, root: str | None) -> str | None:
    """The status of the run that ``cfg`` names under ``root``, or None if there is none."""
    from trajscope.store import Run
    from trajscope.store.paths import is_run_dir
    from trajscope.train.trainer import run_path

    path = run_path(cfg, root)
    if not is_run_dir(path):
        return None
    with Run.open(path) as run:
        return run.status


def cached_summary(cfg: RunConfig, root: str | None) -> dict[str, Any]:
    from trajscope.store import Run
    from trajscope.train import summary
    from trajscope.train.trainer import run_path

    with Run.open(run_path(cfg, root)) as run:
        return summary(run, cached=True)


def run_configs(configs: Sequence[RunConfig], root: str | os.PathLike | None = None, executor: str = "local",
                jobs: int = 1, address: str | None = None, progress: bool = True, threads: int | None = None,
                on_result: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train every config into ``root``; return their summaries in the order given.

    ``threads``: torch threads per worker (default: 1 when ``jobs`` > 1, else torch's choice).
    ``on_result(i, summary)`` is called as each run ends (in completion order).
    """
    if executor not in EXECUTORS:
        raise unknown_choice("executor", executor, EXECUTORS)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    root_s = None if root is None else str(Path(root))
    configs = list(configs)
    if executor == "ray":
        from trajscope.integrations.ray import run_configs_ray  # optional extra

        return run_configs_ray(configs, root_s, address=address, jobs=jobs, threads=threads, progress=progress,
                               on_result=on_result)
    if threads is None and jobs > 1:
        threads = 1
    results: list[dict[str, Any] | None] = [None] * len(configs)
    bar = _bar(len(configs), progress)
    if jobs == 1:
        for i, cfg in enumerate(configs):
            results[i] = train_one(cfg, root_s, threads)
            _done(i, results[i], bar, on_result)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(train_one, c.model_dump(mode="json"), root_s, threads): i
                       for i, c in enumerate(configs)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as e:  # the worker process itself died
                    results[i] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                  "workload": configs[i].workload}
                _done(i, results[i], bar, on_result)
    bar.close()
    return [r for r in results if r is not None]


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run", disable=not enabled or None, dynamic_ncols=True, leave=False)


def _done(i: int, result: dict[str, Any], bar, on_result) -> None:
    bar.update(1)
    if on_result is not None:
        on_result(i, result)


def read_configs(path: str | os.PathLike) -> list[RunConfig]:
    """The configs of a JSON-lines file, one object per line: ``workload`` and any
    :class:`RunConfig` fields (the rest take the workload's defaults; a full ``model_dump`` works
    too). Blank lines and lines starting with ``#`` are skipped; a bad line is a one-line
    UsageError naming its number."""
    import json

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"no such config file: {p}")
    configs = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{p} line {n}: not JSON ({e.msg})") from None
        if not isinstance(values, dict) or "workload" not in values:
            raise UsageError(f"{p} line {n}: expected a JSON object with a 'workload'")
        try:
            configs.append(RunConfig.for_workload(values.pop("workload"), **values))
        except UsageError as e:
            raise UsageError(f"{p} line {n}: {e}") from None
    if not configs:
        raise UsageError(f"{p} holds no configs")
    return configs


def failed(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summaries of the runs that failed (not the diverged ones: divergence is a result)."""
    return [r for r in results if r.get("status") == "failed"]
