"""The ``trajscope`` command.

Errors a user causes (an unknown name, a bad value, a missing run) print one line and exit with a
non-zero code (2 for usage errors), without a traceback. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

try:  # typer >= 0.2x vendors its own copy of click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as cx

from trajscope.errors import TrajscopeError, UsageError, unknown_choice

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Record, measure and steer the early phase of PyTorch training.")

EXIT_DIVERGED = 3
EXIT_CRASHED = 1

RootOpt = typer.Option(None, "--root", help="Runs root directory (default ./runs or $TRAJSCOPE_ROOT).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object.")
ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: torch's choice). "
                          "Small models often train faster with 1, especially on a busy machine.")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=None, sort_keys=True, default=str))


def _parse_options(items: List[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _print_summary(s: dict[str, Any]) -> None:
    final = ", ".join(f"{k} {v:.4g}" for k, v in (s.get("final") or {}).items())
    typer.echo(f"run {s['run_id']}  {s['status']}  steps {s['steps']}  workload {s.get('workload')}")
    if final:
        typer.echo(f"  final: {final}")
    if s.get("status_reason"):
        typer.echo(f"  {s['status']} at step {s.get('status_step')}: {s['status_reason']}")
    if s.get("wall_s"):
        typer.echo(f"  wall time {s['wall_s']:.1f} s")
    typer.echo(f"  path: {s['path']}")


def _exit_for(status: str) -> None:
    if status == "diverged":
        raise typer.Exit(EXIT_DIVERGED)
    if status == "crashed":
        raise typer.Exit(EXIT_CRASHED)


@app.command()
def run(
    workload: str = typer.Argument(..., help="Workload name ('trajscope workloads' lists them)."),
    optimizer: Optional[str] = typer.Option(None, help="sgd, adam, adamw or muon (default: the workload's)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum (Muon momentum for muon)."),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov", help="Nesterov momentum (sgd)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per step."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    schedule: Optional[str] = typer.Option(None, help="constant, warmup-cosine, step or exp."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Warmup steps (warmup-cosine)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps."),
    seed: int = typer.Option(0, help="Random seed (data split, init, batch order)."),
    option: List[str] = typer.Option([], "--option", "-o", help="Workload option KEY=VALUE (repeatable)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Data directory (cifar10-resnet20)."),
    record: str = typer.Option("default", help="Recording preset: default, minimal, full or none."),
    probe: List[str] = typer.Option([], "--probe", help="A probe KIND[:key=value,...] (repeatable), e.g. "
                                    "sharpness:every=16."),
    controller: List[str] = typer.Option([], "--controller", help="A controller KIND[:key=value,...] "
                                         "(repeatable)."),
    root: Optional[Path] = RootOpt,
    name: Optional[str] = typer.Option(None, help="A name for the run (an alias of its id)."),
    resume: bool = typer.Option(False, help="Continue an existing run of this config from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Delete an existing run of this config first."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train a workload and record the run."""
    _set_threads(threads)
    from trajscope import workloads
    from trajscope.config import CallbackSpec, RecordConfig, RunConfig
    from trajscope.train import Trainer

    workloads.get(workload)  # unknown name -> one-line error first
    options = _parse_options(option)
    if data_dir is not None:
        options["data_dir"] = data_dir
    config = RunConfig.for_workload(
        workload, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        batch_size=batch_size, steps=steps, schedule=schedule, warmup_steps=warmup_steps, eval_every=eval_every,
        seed=seed, workload_options=options, record=RecordConfig.preset(record),
        probes=tuple(CallbackSpec.parse(p) for p in probe), controllers=tuple(CallbackSpec.parse(c) for c in controller))
    result = Trainer(config, root=root, name=name, progress=progress and not as_json, resume=resume,
                     overwrite=overwrite).fit()
    if as_json:
        _echo_json(result)
    else:
        if result.get("cached"):
            typer.echo("(this config already has a finished run; --overwrite to train it again)")
        _print_summary(result)
    _exit_for(result["status"])


@app.command("ls")
def ls(root: Optional[Path] = RootOpt, as_json: bool = JsonOpt) -> None:
    """List the runs under the root."""
    from trajscope.store import list_runs

    infos = list_runs(root)
    if as_json:
        _echo_json({"runs": [i.to_dict() for i in infos]})
        return
    if not infos:
        typer.echo("no runs")
        return
    typer.echo(f"{'run id':<14}{'name':<16}{'status':<10}{'steps':>7}  workload")
    for i in infos:
        typer.echo(f"{i.run_id:<14}{(i.name or '-'):<16}{i.status:<10}{(i.steps if i.steps is not None else '-'):>7}"
                   f"  {i.workload or '-'}" + (f"  ({i.error})" if i.error else ""))


@app.command()
def show(ref: str = typer.Argument(..., metavar="RUN", help="Run id, unique prefix or name."),
         root: Optional[Path] = RootOpt, as_json: bool = JsonOpt) -> None:
    """Status, steps, final metrics and files of one run."""
    from trajscope.store import open_run
    from trajscope.train import summary

    r = open_run(ref, root)
    try:
        s = summary(r)
        meta = r.meta
        s.update({"config": r.config, "seed": r.seed, "versions": meta.get("versions"), "host": meta.get("host"),
                  "started_at": meta.get("started_at"), "ended_at": meta.get("ended_at"),
                  "scalars": r.scalar_names(), "snapshots": {k: len(r.snapshot_steps(k)) for k in r.snapshot_kinds()},
                  "sketches": len(r.sketches()[0]), "database": str(r.path / "run.db")})
        s["decisions"], last = _decisions(r.events())
    finally:
        r.close()
    if as_json:
        _echo_json(s)
        return
    _print_summary(s)
    typer.echo(f"  scalars: {', '.join(s['scalars'])}")
    typer.echo(f"  snapshots: {s['snapshots'] or 'none'}; sketches: {s['sketches']}")
    if s["decisions"]:
        typer.echo("  decisions: " + ", ".join(f"{k} {n}" for k, n in s["decisions"].items()))
        for name, step, message, reason in last:
            typer.echo(f"    last {name}, step {step}: {message}" + (f" ({reason})" if reason else ""))
    typer.echo(f"  versions: {s['versions']}")


def _decisions(events) -> tuple[dict[str, int], list[tuple[str, Any, str, Any]]]:
    """Controller decisions in a run's events: the count per controller, and each one's last
    (controller, step, message, reason)."""
    from trajscope.controllers.base import KIND
    from trajscope.report.data import events_of

    counts: dict[str, int] = {}
    last: dict[str, tuple[str, Any, str, Any]] = {}
    for e in events_of(events, KIND):
        name = str(e["data"].get("controller") or KIND)
        counts[name] = counts.get(name, 0) + 1
        last[name] = (name, e["step"], e["message"], e["data"].get("reason"))
    return counts, list(last.values())


@app.command()
def export(ref: str = typer.Argument(..., metavar="RUN", help="Run id, unique prefix or name."),
           fmt: str = typer.Option("parquet", "--format", help="parquet, csv, tensorboard or mlflow."),
           out: Optional[str] = typer.Option(None, "--out", help="Output file or fsspec URL (default RUN_ID.FORMAT); "
                                                                  "a directory for tensorboard; for mlflow a "
                                                                  "tracking store: a directory or sqlite:///FILE.db "
                                                                  "(default sqlite:///mlflow.db)."),
           root: Optional[Path] = RootOpt, as_json: bool = JsonOpt) -> None:
    """Export a run's scalars (long format: step, name, value), or TensorBoard event files."""
    from trajscope.store import open_run

    if fmt not in ("parquet", "csv", "tensorboard", "mlflow"):
        raise unknown_choice("export format", fmt, ("parquet", "csv", "tensorboard", "mlflow"))
    if fmt == "mlflow":
        from trajscope.integrations.mlflow import export_mlflow

        info = export_mlflow(ref, root=root, out=out or "sqlite:///mlflow.db")
        if as_json:
            _echo_json({"format": fmt, "out": info["uri"], **info})
        else:
            typer.echo(f"wrote {info['params']} params and {info['metrics']} metric points of run {info['run_id']} "
                       f"to MLflow run {info['mlflow_run_id']} at {info['uri']} (mlflow ui --backend-store-uri "
                       f"{info['uri']})")
        return
    if fmt == "tensorboard":
        from trajscope.report import export_tensorboard

        info = export_tensorboard(ref, root=root, out_dir=out)
        if as_json:
            _echo_json({"format": fmt, "out": str(info["out_dir"]), **info})
        else:
            typer.echo(f"wrote {info['scalars']} scalar points and {info['histograms']} histograms "
                       f"to {info['out_dir']} (tensorboard --logdir {info['out_dir']})")
        return
    r = open_run(ref, root)
    try:
        out = out or f"{r.id}.{fmt}"
        rows = len(r.scalars())
        r.export(out, fmt)
    finally:
        r.close()
    if as_json:
        _echo_json({"run_id": r.id, "format": fmt, "out": out, "rows": rows})
    else:
        typer.echo(f"wrote {rows} scalar rows to {out}")


@app.command()
def analyze(ref: str = typer.Argument(..., metavar="RUN", help="Run id, unique prefix or name."),
            group: List[str] = typer.Option([], "--group", "-g",
                                            help="Parameter group (repeatable): all, layers, tensors, qkv, "
                                                 "a glob such as 'conv*' (default all)."),
            source: str = typer.Option("auto", "--source",
                                       help="snapshots (exact), sketches (estimated; group all only) or auto."),
            window: int = typer.Option(1, "--window", min=1, help="Window (in snapshot points) of the updates map."),
            root: Optional[Path] = RootOpt,
            progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
            as_json: bool = JsonOpt) -> None:
    """Trajectory maps, MDS, path and early-phase statistics and PCA of a run, stored in the run."""
    from trajscope import measures

    sources = {"auto": None, "snapshots": True, "sketches": False}
    if source not in sources:
        raise unknown_choice("source", source, sources)
    summary = measures.analyze(ref, root=root, groups=list(group) or None, exact=sources[source],
                               progress=progress and not as_json, window=window)
    if as_json:
        _echo_json(summary)
        return
    for line in measures.summary_lines(summary):
        typer.echo(line)


@app.command()
def landscape(ref: str = typer.Argument(..., metavar="RUN", help="Run id, unique prefix or name."),
              plane: str = typer.Option("random", "--plane", help="random (filter-normalized) or pca."),
              steps: int = typer.Option(51, "--steps", min=2, help="Grid points per axis."),
              data: str = typer.Option("batch", "--data", help="batch (a fixed batch) or train (the full set)."),
              batch_size: int = typer.Option(1000, "--batch-size", min=1, help="Examples in the fixed batch."),
              seed: int = typer.Option(0, help="Seed of the random directions."),
              root: Optional[Path] = RootOpt,
              progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
              as_json: bool = JsonOpt) -> None:
    """Loss on a 2-D plane through a stored snapshot, with the trajectory projected on it."""
    from trajscope.landscape import landscape as make_landscape

    if plane not in ("random", "pca"):
        raise unknown_choice("plane", plane, ("random", "pca"))
    if data not in ("batch", "train"):
        raise unknown_choice("data", data, ("batch", "train"))
    summary = make_landscape(ref, root=root, plane=plane, steps=steps, data=data, batch_size=batch_size, seed=seed,
                             progress=progress and not as_json)
    if as_json:
        _echo_json(summary)
    else:
        typer.echo(f"run {summary['run_id']}: {plane} plane {steps}x{steps} around step {summary['center_step']}: "
                   f"loss {summary['loss_min']:.4g}..{summary['loss_max']:.4g} (center {summary['loss_center']:.4g}); "
                   f"stored as {summary['result']} ({summary['wall_s']:.1f} s)")


@app.command()
def report(refs: List[str] = typer.Argument(..., metavar="RUN...", help="One or more runs (id, prefix or name)."),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default ./report-<id>.html)."),
           figures: Optional[Path] = typer.Option(None, "--figures", help="Also save every figure as a PNG here."),
           analyze: bool = typer.Option(True, "--analyze/--no-analyze",
                                        help="Compute trajectory measures first where a run has none stored."),
           root: Optional[Path] = RootOpt, as_json: bool = JsonOpt) -> None:
    """One self-contained HTML page (several runs: overlaid) with every figure embedded."""
    from trajscope.report import write_report

    path = write_report(list(refs), root=root, out=out, figures_dir=figures, analyze=analyze)
    if as_json:
        _echo_json({"report": str(path), "runs": list(refs)})
    else:
        typer.echo(f"report: {path}")


@app.command("workloads")
def list_workloads(as_json: bool = JsonOpt) -> None:
    """The workloads, one line each."""
    from trajscope import workloads

    ws = workloads.all_workloads()
    if as_json:
        _echo_json({"workloads": [{"name": w.name, "description": w.description, "target": w.target,
                                   "defaults": dict(w.defaults), "options": dict(w.options)} for w in ws]})
        return
    width = max(len(w.name) for w in ws)
    for w in ws:
        typer.echo(f"{w.name:<{width}}  {w.description}")


@app.command()
def demo(root: Optional[Path] = RootOpt, steps: int = typer.Option(1000, help="Optimizer steps."),
         progress: bool = typer.Option(True, "--progress/--no-progress"), threads: Optional[int] = ThreadsOpt,
         as_json: bool = JsonOpt) -> None:
    """Record mnist1d-cnn with the default recorder and print a summary (about a minute)."""
    _set_threads(threads)
    from trajscope.config import RunConfig
    from trajscope.store import Run
    from trajscope.train import Trainer

    config = RunConfig.for_workload("mnist1d-cnn", steps=steps)
    result = Trainer(config, root=root, progress=progress and not as_json, overwrite=True).fit()
    r = Run.open(result["path"])
    try:
        detail = {"scalars": len(r.scalars()), "sketches": len(r.sketches()[0]),
                  "snapshots": len(r.snapshot_steps("params")), "checkpoints": len(r.snapshot_steps("checkpoint"))}
    finally:
        r.close()
    result["recorded"] = detail
    if result["status"] in ("finished", "diverged"):
        from trajscope.report import write_report

        out = Path(result["path"]).parent / f"report-{result['run_id']}.html"
        result["report"] = str(write_report([result["path"]], out=out, analyze=True))
    if as_json:
        _echo_json(result)
    else:
        _print_summary(result)
        typer.echo(f"  recorded: {detail['scalars']} scalar values, {detail['sketches']} sketches, "
                   f"{detail['snapshots']} parameter snapshots, {detail['checkpoints']} checkpoints")
        if result.get("report"):
            typer.echo(f"  report: {result['report']}")
        typer.echo(f"  next: trajscope show {result['run_id']} --root {root or 'runs'}")
    _exit_for(result["status"])


@app.command()
def study(name: Optional[str] = typer.Argument(None, metavar="NAME", help="The study ('--list' names them)."),
          list_: bool = typer.Option(False, "--list", help="Name every study with one line each."),
          quick: bool = typer.Option(False, "--quick", help="A reduced version (under a minute), for tests."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory of the section, figures and "
                                             "JSON (default <root>/studies)."),
          executor: str = typer.Option("local", "--executor", help="local or ray."),
          jobs: int = typer.Option(1, "--jobs", min=1, help="Runs in parallel (local executor)."),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray executor)."),
          root: Optional[Path] = RootOpt, threads: Optional[int] = ThreadsOpt,
          progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
          as_json: bool = JsonOpt) -> None:
    """Reproduce a published early-phase finding: runs, analysis, and a table against the paper."""
    _set_threads(threads)
    from trajscope import studies

    if list_:
        items = studies.all_studies()
        if as_json:
            _echo_json({"studies": [{"name": s.name, "title": s.title, "summary": s.summary, "paper": s.paper,
                                     "expected_minutes": s.expected_minutes} for s in items]})
        else:
            width = max((len(s.name) for s in items), default=0)
            for s in items:
                typer.echo(f"{s.name:<{width}}  {s.summary} (~{s.expected_minutes:.0f} min)")
        return
    if name is None:
        raise UsageError("give a study NAME or --list")
    result = studies.run_study(name, quick=quick, root=root, out_dir=out, executor=executor, jobs=jobs,
                               address=address, progress=progress and not as_json,
                               say=None if as_json else typer.echo)
    if as_json:
        _echo_json(result.to_dict())
        return
    for f in result.findings:
        typer.echo(f"  [{f.verdict}] {f.claim}: paper {f.paper}; here {f.measured}" + (f" ({f.why})" if f.why else ""))
    typer.echo(f"section: {result.section}")


@app.command()
def tune(workload: str = typer.Argument(..., help="Workload name ('trajscope workloads' lists them)."),
         method: str = typer.Option("early-race", "--method", help="range-test, curvature or early-race."),
         optimizer: Optional[str] = typer.Option(None, help="Optimizer (default: the workload's)."),
         momentum: Optional[float] = typer.Option(None, help="SGD momentum (default: the workload's)."),
         steps: Optional[int] = typer.Option(None, help="Budget of the final run (default: the workload's)."),
         seed: int = typer.Option(0, help="Random seed."),
         record: str = typer.Option("default", help="Recording preset of the runs: default, minimal, full or none."),
         executor: str = typer.Option("local", "--executor", help="local or ray (the race's candidate runs)."),
         jobs: int = typer.Option(1, "--jobs", min=1, help="Candidate runs in parallel (local executor)."),
         address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray executor)."),
         cooldown: float = typer.Option(0.0, "--cooldown", help="early-race: rank the last rung by the loss after "
                                        "a cooldown branch of this fraction of the budget (e.g. 0.025; 0: none)."),
         root: Optional[Path] = RootOpt, threads: Optional[int] = ThreadsOpt,
         progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
         as_json: bool = JsonOpt) -> None:
    """Choose the learning rate from the early phase, train at it, and store the decision in the run."""
    _set_threads(threads)
    from trajscope import workloads
    from trajscope.controllers.lr_select import select_lr
    from trajscope.sweep import EXECUTORS

    workloads.get(workload)
    if executor not in EXECUTORS:
        raise unknown_choice("executor", executor, EXECUTORS)
    options = {}
    if cooldown:
        if method != "early-race":
            raise UsageError(f"--cooldown applies to --method early-race, not {method}")
        options["cooldown"] = cooldown
    sel = select_lr(workload, method, optimizer=optimizer, momentum=momentum, steps=steps, seed=seed,
                    root=root, executor=executor, jobs=jobs, address=address, record=record,
                    progress=progress and not as_json, **options)
    out = sel.to_dict()
    if as_json:
        _echo_json(out)
    else:
        c = out["choose"]
        typer.echo(f"{method}: lr {sel.lr:.4g} ({sel.optimizer}) - {sel.reason}")
        typer.echo(f"  choosing: {c['steps']} steps, {c['hvps']} Hessian-vector products, {c['wall_s']:.1f} s; "
                   f"total {out['total_step_equivalents']:.0f} step-equivalents for a {sel.budget}-step budget")
        if sel.run:
            _print_summary(sel.run)
    _exit_for((sel.run or {}).get("status", "finished"))


@app.command()
def sweep(file: Path = typer.Argument(..., metavar="FILE.jsonl", help="One run config per line (JSON): a 'workload' "
                                      "and any run fields; the others take the workload's defaults."),
          executor: str = typer.Option("local", "--executor", help="local or ray."),
          jobs: int = typer.Option(1, "--jobs", min=1, help="Runs in parallel (worker processes, or Ray trials)."),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray executor)."),
          root: Optional[Path] = RootOpt, threads: Optional[int] = ThreadsOpt,
          progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
          as_json: bool = JsonOpt) -> None:
    """Train every config of a file into one store; finished runs are reused, failures reported (exit 1)."""
    from trajscope.sweep import failed, read_configs, run_configs

    configs = read_configs(file)
    results = run_configs(configs, root=root, executor=executor, jobs=jobs, address=address,
                          progress=progress and not as_json, threads=threads)
    bad = failed(results)
    if as_json:
        _echo_json({"runs": results, "failed": len(bad)})
    else:
        for i, r in enumerate(results):
            metric = (r.get("final") or {}).get("val_metric")
            detail = r.get("error") or (f"val_metric {metric:.4g}" if metric is not None else "")
            typer.echo(f"{i:>3}  {r.get('run_id', '-'):<14}{r['status']:<10}{r.get('steps', '-')!s:>7}  "
                       f"{r.get('workload') or '-'}  {detail}" + ("  (cached)" if r.get("cached") else ""))
        typer.echo(f"{len(results)} runs, {len(bad)} failed")
    if bad:
        raise typer.Exit(EXIT_CRASHED)


def _usage_line(e: cx.UsageError) -> str:
    msg = e.format_message().splitlines()[0] if e.format_message() else str(e)
    if isinstance(e, cx.NoSuchOption) and e.ctx is not None:
        opts = sorted(o for p in e.ctx.command.params for o in p.opts if o.startswith("--"))
        msg = f"no such option: {e.option_name}; valid options: {', '.join(opts)}"
    elif e.ctx is not None and e.ctx.command is not None and hasattr(e.ctx.command, "commands") \
            and "No such command" in msg:
        msg = msg.rstrip(".") + f"; valid commands: {', '.join(sorted(e.ctx.command.commands))}"
    return msg


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors, exit codes (0 ok, 1 crashed, 2 usage, 3 diverged)."""
    try:
        rv = app(args=argv, prog_name="trajscope", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        typer.echo("trajscope: aborted", err=True)
        return 130
    except cx.UsageError as e:
        typer.echo(f"trajscope: error: {_usage_line(e)}", err=True)
        return 2
    except cx.ClickException as e:
        typer.echo(f"trajscope: error: {e.format_message()}", err=True)
        return e.exit_code
    except TrajscopeError as e:
        typer.echo(f"trajscope: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        typer.echo("trajscope: interrupted", err=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
