"""The redundancy freeze: kept sets and exact counts, skipped gradients and updates, the forced
switch (at_step), the one-line error for a model without normalization, and the Trainer/CLI paths.
The redundancy criterion itself is tested in test_controllers_redundancy.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from trajscope import workloads
from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.controllers import KIND, LoopHooks
from trajscope.controllers.freeze import FreezeController, freeze_except, kept_parameter_names
from trajscope.errors import UsageError
from trajscope.store import Run
from trajscope.train import Trainer
from trajscope.train.optim import make_optimizer

ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def decisions(run):
    """(step, message, data) of each controller decision of a stored run."""
    ev = run.events()
    ev = ev[ev["kind"] == KIND]
    return [(int(st), m, d if isinstance(d, dict) else json.loads(d)) for st, m, d in zip(ev["step"], ev["message"], ev["data"])]


def _numel(model, names):
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def test_resnet20_keeps_exactly_its_1376_batchnorm_scalars():
    model = workloads.get("cifar10-resnet20").make_model({})
    kept = kept_parameter_names(model)
    # 19 BatchNorm2d layers: 7 of 16 channels, 6 of 32, 6 of 64; scale + shift each.
    assert _numel(model, kept) == 2 * (7 * 16 + 6 * 32 + 6 * 64) == 1376
    assert all(n.endswith((".weight", ".bias")) and ("bn" in n) for n in kept)
    with_fc = kept_parameter_names(model, last_layer=True)
    assert _numel(model, with_fc) == 1376 + 64 * 10 + 10
    counts = freeze_except(model, kept)
    assert counts == {"kept_params": 1376, "frozen_params": 269722 - 1376, "total_params": 269722,
                      "kept_tensors": 38, "frozen_tensors": 21}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == kept


def test_kept_set_globs_and_errors():
    mlp = workloads.get("mnist1d-mlp").make_model({})
    with pytest.raises(UsageError, match="has no normalization parameters to keep; name the set"):
        kept_parameter_names(mlp)
    assert kept_parameter_names(mlp, keep="4.*") == ["4.weight", "4.bias"]
    assert kept_parameter_names(mlp, keep=[], last_layer=True) == ["4.weight", "4.bias"]
    with pytest.raises(UsageError, match="keep='nope.*' matches no parameter"):
        kept_parameter_names(mlp, keep="nope.*")
    with pytest.raises(UsageError, match="holds every parameter"):
        kept_parameter_names(mlp, keep="*")
    ln = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert kept_parameter_names(ln) == ["1.weight", "1.bias"]


def _cnn_loop(at_step, steps, seed=0):
    """A plain loop on mnist1d-cnn (width 8) with a freeze controller; returns per-step snapshots."""
    wl = workloads.get("mnist1d-cnn")
    cfg = RunConfig.for_workload("mnist1d-cnn", workload_options={"width": 8}, lr=0.05, momentum=0.9,
                                 weight_decay=1e-3)
    data = wl.make_data(seed, cfg.workload_options)
    torch.manual_seed(seed)
    model = wl.make_model(cfg.workload_options)
    opt = make_optimizer(model, cfg)
    ctl = FreezeController(at_step=at_step)
    hooks = LoopHooks([ctl], model, opt, loss_fn=wl.loss_fn)
    hooks.start()
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        idx = torch.randint(0, len(data.x_train), (32,), generator=g)
        x, y = data.x_train[idx], data.y_train[idx]
        loss = wl.loss_fn(model(x), y)
        loss.backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        hooks.before_optimizer_step((x, y), loss)
        opt.step()
        hooks.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters() if p in opt.state}
        seen.append((grads, params, state))
    return model, ctl, hooks, seen


def test_forced_switch_skips_gradients_updates_and_optimizer_state():
    K, steps = 3, 6
    model, ctl, hooks, seen = _cnn_loop(at_step=K, steps=steps)
    kept = set(kept_parameter_names(model))
    assert ctl.state.switched and ctl.state.switch_step == K and ctl.state.switch_reason == "at_step"
    assert ctl.state.kept_params == 2 * 3 * 8 and ctl.state.total_params == sum(p.numel() for p in model.parameters())
    grads_k, params_k, state_k = seen[K - 1]  # after step K: the last full update
    for t in range(K, steps):  # steps K+1 .. steps
        grads, params, state = seen[t]
        for n in params:
            if n in kept:
                assert grads[n] is not None and not torch.equal(params[n], seen[t - 1][1][n])
            else:
                assert grads[n] is None  # autograd skipped the weight gradient
                assert torch.equal(params[n], params_k[n])  # bit-unchanged (no update, no weight decay)
                assert torch.equal(state[n], state_k[n])  # momentum buffer untouched
    assert [p.requires_grad for n, p in model.named_parameters()] == [n in kept for n, _ in model.named_parameters()]
    (decision,) = hooks.run.decisions("freeze")
    assert decision["step"] == K and decision["data"]["evidence"]["kept_params"] == 48
    assert decision["data"]["state"]["switch_step"] == K


def test_at_step_zero_freezes_before_the_first_update():
    model, ctl, _, seen = _cnn_loop(at_step=0, steps=2)
    kept = set(kept_parameter_names(model))
    assert ctl.state.switch_step == 0
    assert all(seen[0][0][n] is None for n in seen[0][0] if n not in kept)


def _graph(loss):
    """(node class names, leaf tensors with an AccumulateGrad node) of loss's autograd graph."""
    seen, names, leaves, todo = set(), [], [], [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return names, leaves


def test_after_the_switch_the_graph_holds_no_node_for_a_frozen_tensor_or_the_frozen_prefix():
    # Why the frozen step has no extra work to shed: the graph accumulates into the kept tensors
    # only, and the first convolution (frozen, fed by the input) is not in the graph at all, so
    # running that prefix under no_grad would change nothing.
    wl = workloads.get("mnist1d-cnn")
    model = wl.make_model({"width": 8})
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    names, leaves = _graph(wl.loss_fn(model(x), y))
    assert names.count("ConvolutionBackward0") == 3 and len(leaves) == len(list(model.parameters()))
    kept = kept_parameter_names(model)
    freeze_except(model, kept)
    assert not model.features[0](x.unsqueeze(1)).requires_grad
    names, leaves = _graph(wl.loss_fn(model(x), y))
    params = dict(model.named_parameters())
    assert {id(t) for t in leaves} == {id(params[n]) for n in kept}
    assert names.count("ConvolutionBackward0") == 2  # conv2 and conv3: input gradients for the BatchNorms below
    assert names.count("NativeBatchNormBackward0") == 3


def test_trainer_without_norm_params_fails_in_one_line_and_keeps_the_run(tmp_path):
    cfg = RunConfig.for_workload("mnist1d-mlp", steps=4, eval_every=4, record=RecordConfig.preset("minimal"),
                                 controllers=(CallbackSpec(kind="freeze", options={"at_step": 2}),))
    with pytest.raises(UsageError, match="no normalization parameters"):
        Trainer(cfg, root=tmp_path, progress=False).fit()
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = Run.open(path)
    assert run.status == "crashed" and "no normalization parameters" in run.meta["status_reason"]
    ok = cfg.model_copy(update={"controllers": (CallbackSpec(kind="freeze", options={"at_step": 2, "keep": "4.*"}),)})
    out = Trainer(ok, root=tmp_path, progress=False).fit()
    assert out["status"] == "finished"
    run = Run.open(out["path"])
    ((step, _, data),) = decisions(run)
    assert step == 2 and data["evidence"]["kept_params"] == 256 * 10 + 10
    assert run.scalars(["freeze/trainable_params"])["value"].tolist() == [2570.0]


def _cli(*args, root):
    argv = [sys.executable, "-m", "trajscope.cli", *args, "--root", str(root)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=ENV)


def test_cli_freeze_on_synthetic_resnet20_records_switch_and_counts(tmp_path):
    p = _cli("run", "cifar10-resnet20", "-o", "synthetic=true", "--steps", "2", "--batch-size", "4",
             "--eval-every", "2", "--record", "none", "--controller", "freeze:at_step=1", "--json", root=tmp_path)
    assert p.returncode == 0, p.stderr
    run = Run.open(json.loads(p.stdout)["path"])
    ((_, _, data),) = decisions(run)
    assert data["state"]["switch_step"] == 1 and data["state"]["kept_params"] == 1376
    assert data["state"]["frozen_params"] == 269722 - 1376 and data["controller"] == "freeze"
    bad = _cli("run", "mnist1d-mlp", "--steps", "2", "--controller", "freeze:at_step=1", root=tmp_path)
    assert bad.returncode == 2 and "no normalization parameters" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_benchmark_fork_owns_its_optimizer_state():
    """The freeze benchmark's full copy must not share momentum buffers with the frozen original:
    stepping one side leaves the other's state and weights as they were, and each side equals a
    reference trained alone from the same fork."""
    import copy
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "redundancy_freeze.py"
    spec = importlib.util.spec_from_file_location("redundancy_freeze_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = RunConfig.for_workload("mnist1d-cnn", momentum=0.9)
    wl = workloads.get("mnist1d-cnn")
    data = wl.make_data(0, cfg.workload_options)
    torch.manual_seed(0)
    model = wl.make_model(cfg.workload_options)
    opt = make_optimizer(model, cfg)
    x, y = data.x_train[:32], data.y_train[:32]

    def step(m, o):
        o.zero_grad(set_to_none=True)
        wl.loss_fn(m(x), y).backward()
        o.step()

    step(model, opt)  # momentum buffers exist
    ref_model = copy.deepcopy(model)
    ref_opt = make_optimizer(ref_model, cfg)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m in (model, ref_model):
        freeze_except(m, kept_parameter_names(m))
    full, full_opt = bench.fork_full(model, opt, cfg)
    before = [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for _ in range(3):
        step(full, full_opt)
    after = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the full side wrote nothing of the frozen's
    for _ in range(3):
        step(model, opt), step(ref_model, ref_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
