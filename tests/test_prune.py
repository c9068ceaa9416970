"""Magnitude masks and rewind perturbations (trajscope.functional.prune) against slow references, and
the imp controller: pruned weights stay exactly zero, the mask is 20% of the survivors, the schedule
is rewound with the weights."""

import math

import pytest
import torch

from trajscope.config import CallbackSpec, RecordConfig, RunConfig
from trajscope.errors import UsageError
from trajscope.functional import prune as P
from trajscope.store import Run
from trajscope.train import Trainer
from trajscope.train.optim import schedule_factor


def _slow_masks(weights, masks, fraction):
    """Loop over every surviving element, sort by (|w|, position) with Python's sort, drop the first k."""
    items = []
    pos = 0
    for n, w in weights.items():
        flat = w.ravel().tolist()
        alive = masks[n].ravel().tolist() if masks else [True] * len(flat)
        for i, (v, a) in enumerate(zip(flat, alive)):
            if a:
                items.append((abs(v), pos + i, n, i))
        pos += len(flat)
    k = int(round(fraction * len(items)))
    drop = {(n, i) for _, _, n, i in sorted(items)[:k]}
    out = {}
    for n, w in weights.items():
        alive = masks[n].ravel().tolist() if masks else [True] * w.numel()
        out[n] = torch.tensor([a and (n, i) not in drop for i, a in enumerate(alive)]).view(w.shape)
    return out


def test_global_masks_match_the_slow_reference_over_rounds():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(4, 5, generator=g), "b": torch.randn(3, 2, 2, generator=g) * 0.3,
               "c": torch.randn(7, 1, generator=g) * 3}
    weights["a"][0, :3] = 0.5  # ties, broken by position
    masks = None
    for r in range(1, 5):
        fast = P.global_magnitude_masks(weights, masks, 0.2)
        slow = _slow_masks(weights, masks, 0.2)
        assert all(torch.equal(fast[n], slow[n]) for n in weights)
        masks = fast
        total = sum(w.numel() for w in weights.values())
        alive = total
        for _ in range(r):
            alive -= int(round(0.2 * alive))
        assert P.sparsity(masks) == pytest.approx(1 - alive / total)


def test_masks_are_global_not_per_layer():
    weights = {"small": torch.full((10,), 0.01), "large": torch.arange(1.0, 11.0)}
    m = P.global_magnitude_masks(weights, None, 0.5)
    assert int(m["small"].sum()) == 0 and int(m["large"].sum()) == 10


def test_prunable_names_are_the_matrices_and_kernels():
    named = [("w", torch.zeros(3, 4)), ("b", torch.zeros(3)), ("k", torch.zeros(2, 1, 5)), ("bn", torch.zeros(2))]
    assert P.prunable_names(named) == ["w", "k"]


def test_perturbations():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 40, generator=g)
    fresh = torch.randn(50, 40, generator=g)
    s = P.sign_reinit(w, fresh)
    assert torch.equal(s.sign(), torch.where(w >= 0, 1.0, -1.0)) and torch.equal(s.abs(), fresh.abs())
    p = P.permute_within(w, torch.Generator().manual_seed(2))
    assert torch.equal(p.ravel().sort().values, w.ravel().sort().values) and not torch.equal(p, w)
    n = P.add_scaled_noise(w, std=0.5, scale=2.0, generator=torch.Generator().manual_seed(3))
    # the noise has std scale * std = 1.0: over 2,000 draws the sample std is within 5% (about 3 sigma)
    assert float((n - w).std()) == pytest.approx(1.0, rel=0.05)


def _cfg(steps, controllers=(), record=None):
    return RunConfig.for_workload("mnist1d-cnn", workload_options={"width": 8}, steps=steps, batch_size=64,
                                  eval_every=steps, weight_decay=1e-3,
                                  record=record or RecordConfig(snapshots="every", snapshot_every=5,
                                                                buffers=True, sketch_dim=0, checkpoint_every=steps),
                                  controllers=controllers)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("imp")
    return root, Trainer(_cfg(20), root=root, progress=False).fit()


def test_imp_round_keeps_pruned_weights_at_zero_and_rewinds(dense):
    root, d = dense
    spec = CallbackSpec(kind="imp", options={"rewind_run": d["run_id"], "rewind_step": 5, "mask_run": d["run_id"],
                                             "schedule_offset": 5, "schedule_steps": 20, "perturb": "noise"})
    r1 = Trainer(_cfg(15, (spec,)), root=root, progress=False).fit()
    assert r1["status"] == "finished"
    run, src = Run.open(r1["path"]), Run.open(d["path"])
    mask = {n: t.bool() for n, t in run.load_snapshot(0, "mask").items()}
    assert set(mask) == {"features.0.weight", "features.3.weight", "features.6.weight", "head.weight"}
    total = sum(m.numel() for m in mask.values())
    assert sum(int((~m).sum()) for m in mask.values()) == round(0.2 * total)
    for step in run.snapshot_steps("params"):  # exactly zero at every recorded step, the final one included
        snap = run.load_snapshot(step, "params")
        assert all(float(snap[n][~m].abs().max()) == 0.0 for n, m in mask.items())
    final = run.load_state(run.snapshot_steps("checkpoint")[-1])["model"]
    assert all(float(final[n][~m].abs().max()) == 0.0 for n, m in mask.items())
    # step 0 is the rewound state: the dense run's step 5 (plus noise on the prunable tensors), masked
    start, k5 = run.load_snapshot(0, "params"), src.load_snapshot(5, "params")
    assert torch.equal(start["features.1.weight"], k5["features.1.weight"])  # BN scale: not perturbed
    assert not torch.equal(start["features.3.weight"], k5["features.3.weight"] * mask["features.3.weight"])
    # the schedule is rewound: update t uses the dense run's rate of update 5 + t
    lr = run.scalars(["lr"])
    full = _cfg(20)
    for t, v in zip(lr["step"], lr["value"]):
        assert v == pytest.approx(full.lr * schedule_factor(full, int(t) + 5), rel=1e-6)


def test_imp_refuses_a_missing_run_in_one_line(tmp_path):
    spec = CallbackSpec(kind="imp", options={"mask_run": "000000000000"})
    with pytest.raises(UsageError) as e:
        Trainer(_cfg(3, (spec,)), root=tmp_path, progress=False).fit()
    assert "\n" not in str(e.value) and "train it first" in str(e.value)
    with pytest.raises(UsageError):
        Trainer(_cfg(3, (CallbackSpec(kind="imp", options={"perturb": "nope"}),)), root=tmp_path, progress=False).fit()
    assert math.isfinite(P.sparsity({"a": torch.ones(3, dtype=torch.bool)}))
