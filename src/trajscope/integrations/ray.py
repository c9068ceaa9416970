"""Many runs as Ray Tune trials: the ``ray`` executor of :func:`trajscope.sweep.run_configs`.

A config whose run already finished (or diverged) under ``root`` is answered from the store without
a trial. Every other config is one trial that calls :func:`trajscope.sweep.train_one` (so a crashed
run is resumed, and a failed run comes back as a summary with status ``failed``) and writes
its run directory under the shared store ``root``, which every worker must reach at the same path
(one machine, or a shared filesystem on a cluster; trajscope installed on every node). Ray schedules
the trials; trajscope keeps no queue of its own. A trial whose worker dies is reported as
``failed`` with Ray's error, and the other trials go on.

Tune's own experiment state (which the summaries do not need) goes to a temporary directory that
is removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence

from trajscope.config import RunConfig
from trajscope.errors import UsageError

EXTRA_HINT = "the ray executor needs the optional extra 'ray' (pip install 'trajscope[ray]')"


def _import_ray():
    try:
        import ray
        from ray import tune
    except ImportError:
        raise UsageError(EXTRA_HINT) from None
    return ray, tune


def _trial(params: dict[str, Any], configs: list[dict[str, Any]], root: str, threads: int) -> None:
    """One Tune trial: train config ``params["index"]`` and report its summary (as JSON, since Tune
    flattens nested metrics)."""
    from ray import tune

    from trajscope.sweep import train_one

    i = int(params["index"])
    summary = train_one(configs[i], root, threads)
    tune.report({"index": i, "summary": json.dumps(summary, default=str)})


def _connect(ray, address: str | None, jobs: int) -> bool:
    """Join ``address``, or the Ray instance this process already has, or start a local one with
    ``jobs`` CPUs; True if this call started it (and so should shut it down)."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address is not None:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=jobs, **kwargs)
    except ConnectionError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: {e}") from None
    return True


def run_configs_ray(configs: Sequence[RunConfig], root: str | None, address: str | None = None, jobs: int = 1,
                    threads: int | None = None, progress: bool = True,
                    on_result: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train each config as a Ray Tune trial into ``root``; their summaries in the order given.

    ``jobs``: trials at once (and the CPUs of a local Ray instance started here); ``threads``: torch
    threads and CPUs per trial (default 1); ``address``: an existing cluster (``auto``,
    ``ray://host:10001``); ``on_result(i, summary)`` as each trial ends.
    """
    ray, tune = _import_ray()
    from trajscope.store.paths import default_root
    from trajscope.sweep import _bar, cached_summary, existing_status

    configs = list(configs)
    root_abs = os.path.abspath(str(root if root is not None else default_root()))  # trials chdir
    threads = threads or 1
    results: list[dict[str, Any] | None] = [None] * len(configs)
    bar = _bar(len(configs), progress)

    def done(i: int, summary: dict[str, Any]) -> None:
        if results[i] is None:
            results[i] = summary
            bar.update(1)
            if on_result is not None:
                on_result(i, summary)

    class Collect(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            done(int(result["index"]), json.loads(result["summary"]))

        def on_trial_error(self, iteration, trials, trial, **info):
            done(int(trial.config["index"]), _died(configs[int(trial.config["index"])], trial))

    # A config whose run already has its result is answered here, without a trial.
    todo = [i for i, c in enumerate(configs) if existing_status(c, root_abs) not in ("finished", "diverged")]
    for i in sorted(set(range(len(configs))) - set(todo)):
        done(i, cached_summary(configs[i], root_abs))
    if not todo:
        bar.close()
        return results
    started = _connect(ray, address, jobs)
    state_dir = tempfile.mkdtemp(prefix="trajscope-tune-")
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, configs=[c.model_dump(mode="json") for c in configs], root=root_abs,
                                 threads=threads), {"cpu": threads})
        tuner = tune.Tuner(
            trainable, param_space={"index": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=jobs, reuse_actors=True),
            run_config=tune.RunConfig(name="sweep", storage_path=state_dir, verbose=0, callbacks=[Collect()],
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
        with contextlib.redirect_stdout(sys.stderr):  # Tune's tables must not mix with --json output
            grid = tuner.fit()
        for res in grid:  # anything the callback did not see (it should have seen every trial)
            i = int(res.config["index"])
            if res.error is not None:
                done(i, {"status": "failed", "error": f"ray trial failed: {_one_line(res.error)}",
                         "workload": configs[i].workload})
            elif res.metrics and "summary" in res.metrics:
                done(i, json.loads(res.metrics["summary"]))
    finally:
        bar.close()
        shutil.rmtree(state_dir, ignore_errors=True)
        if started:
            ray.shutdown()
    return [r if r is not None else {"status": "failed", "error": "ray returned no result for this trial",
                                     "workload": configs[i].workload} for i, r in enumerate(results)]


def _died(cfg: RunConfig, trial) -> dict[str, Any]:
    err = getattr(trial, "error_msg", None) or "the trial's worker failed"
    return {"status": "failed", "error": f"ray trial failed: {_one_line(err)}", "workload": cfg.workload}


def _one_line(err: Any) -> str:
    lines = [s for s in str(err).strip().splitlines() if s.strip()]
    return lines[-1][:500] if lines else type(err).__name__
