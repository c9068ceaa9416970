"""Export a run to MLflow, so that an existing MLflow dashboard shows trajscope's scalars.

``export_mlflow(ref, uri)`` writes one MLflow run into the experiment ``trajscope`` (by default) of
the tracking store ``uri``: a local directory (MLflow's file store) or ``sqlite:///path.db`` (any
tracking URI MLflow accepts works). What goes where:

- params: the run's config, flattened with ``.`` (``record.sketch_dim``, ``workload_options.width``),
  plus ``seed``; lists and other values as their JSON text;
- metrics: every recorded scalar under its trajscope name (``loss``, ``sharpness/lambda_max``) with
  its step; all points carry the run's start time as their timestamp (trajscope stores no wall
  clock per step);
- tags: ``trajscope.run_id``, ``trajscope.status``, ``trajscope.workload`` and the run's path; the
  MLflow run's name is the trajscope run's name (or id), its status FINISHED (finished), FAILED
  (diverged) or KILLED (crashed).

Exporting the same run again replaces the earlier MLflow run (it is deleted, then written anew).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from trajscope.errors import UsageError

EXPERIMENT = "trajscope"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
_BATCH = 1000  # MLflow's limit on metrics in one log_batch
_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "crashed": "KILLED"}


def flatten_params(config: Mapping[str, Any], seed: int | None = None, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}``: strings as they are, everything else as JSON text;
    an empty mapping is kept as ``{}`` so that no key disappears."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if seed is not None:
        out["seed"] = str(seed)
    for name, value in out.items():
        if len(value) > MAX_PARAM_VALUE:
            raise UsageError(f"config value {name!r} has {len(value)} characters; MLflow takes at most "
                             f"{MAX_PARAM_VALUE}")
    return out


def tracking_uri(out: str | os.PathLike) -> str:
    """A tracking URI from ``--out``: a URI with a scheme as given, a plain path as an absolute path
    (MLflow's file store)."""
    text = str(out)
    if "://" in text or text.startswith("sqlite:"):
        return text
    return str(Path(text).expanduser().resolve())


@contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow >= 3.x refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set; naming a
    directory is that choice, so allow it for this export only."""
    if "://" in uri or uri.startswith("sqlite:"):
        yield
        return
    old = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = old


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UsageError("MLflow export needs the optional extra 'mlflow' (pip install 'trajscope[mlflow]')") from None
    return MlflowClient(tracking_uri=uri)


def _experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):  # artifacts beside the database, not in the current directory
        db = uri.split(":///", 1)[-1]
        location = (Path(db).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def export_mlflow(ref: str, root: str | os.PathLike | None = None, out: str | os.PathLike = "sqlite:///mlflow.db",
                  experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Write run ``ref`` (id, prefix, name or path) to the MLflow store ``out``; return
    ``{"run_id", "uri", "experiment_id", "mlflow_run_id", "params", "metrics", "replaced"}``."""
    from trajscope.store import open_run

    uri = tracking_uri(out)
    run = open_run(ref, root)
    try:
        meta, params = run.meta, flatten_params(run.config, seed=run.seed)
        df = run.scalars()
        df = df[df["value"].notna()]
        status = run.status
        run_id, path, workload = run.id, str(run.path), str(run.config.get("workload", ""))
    finally:
        run.close()
    start_ms = int(1000 * (meta.get("started_at") or meta.get("created_at") or 0))
    with _file_store_allowed(uri):
        client = _client(uri)
        from mlflow.entities import Metric, Param

        exp_id = _experiment(client, experiment, uri)
        old = client.search_runs([exp_id], filter_string=f"tags.`trajscope.run_id` = '{run_id}'")
        for r in old:
            client.delete_run(r.info.run_id)
        tags = {"trajscope.run_id": run_id, "trajscope.status": status, "trajscope.path": path,
                "trajscope.workload": workload}
        mrun = client.create_run(exp_id, start_time=start_ms, tags=tags, run_name=meta.get("name") or run_id)
        mid = mrun.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(mid, params=items[i:i + 100])
        metrics = [Metric(name, float(value), start_ms, int(step)) for step, name, value in df.itertuples(index=False)
                   if not math.isnan(value)]
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(mid, metrics=metrics[i:i + _BATCH])
        if status in _STATUS:
            ended = meta.get("ended_at")
            client.set_terminated(mid, _STATUS[status], end_time=int(1000 * ended) if ended else None)
    return {"run_id": run_id, "uri": uri, "experiment_id": exp_id, "mlflow_run_id": mid, "params": len(params),
            "metrics": len(metrics), "replaced": len(old)}
