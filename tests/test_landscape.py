"""Loss landscapes: the batched grid against a load_state_dict loop, filter normalization, the PCA
plane's trajectory coordinates against a direct least-squares projection, and the stored results."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from trajscope.config import RecordConfig, RunConfig
from trajscope.landscape import (evaluate_points, evaluate_points_reference, filter_normalize, grid_coefficients,
                                 landscape, line_slice, plane_coordinates, random_direction)
from trajscope.measures import Trajectory, pca_directions, trajectory_pca
from trajscope.store import Run
from trajscope.train import Trainer


def _cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 4))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("train", [True, False])
def test_grid_matches_a_load_state_dict_loop(strategy, train):
    model = _cnn()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 1, 6, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in (10, 7)]
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    dirs = [random_direction(origin, g), random_direction(origin, g, ignore=None)]
    coeffs = grid_coefficients(torch.linspace(-1, 1, 5), torch.linspace(-0.5, 1.5, 4))  # 20 points
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = evaluate_points(model, F.cross_entropy, batches, origin, dirs, coeffs, train=train, chunk_size=3,
                          strategy=strategy)
    want = evaluate_points_reference(model, F.cross_entropy, batches, origin, dirs, coeffs, train=train)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1])
    assert ((0 <= want[1]) & (want[1] <= 1)).all()
    for k, v in model.state_dict().items():  # the model is left as it was (running statistics too)
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_filter_normalization():
    model = _cnn()
    w = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        w["4.weight"][1].zero_()  # a dead filter: its direction must be zero, not NaN
    d = random_direction(w, torch.Generator().manual_seed(1))
    for name, t in w.items():
        if t.dim() >= 2:
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), t.flatten(1).norm(dim=1))
        else:  # biases and BatchNorm parameters are zeroed with ignore="biasbn"
            assert torch.count_nonzero(d[name]) == 0
    assert torch.count_nonzero(d["4.weight"][1]) == 0
    raw = {n: torch.randn(t.shape) for n, t in w.items()}
    kept = filter_normalize(raw, w, ignore=None)
    for name, t in w.items():
        if t.dim() < 2:
            assert float(kept[name].norm()) == pytest.approx(float(t.norm()), rel=1e-5)
        if t.dim() < 2 and float(t.norm()) > 0:  # (BatchNorm's bias is 0 at init: a zero direction)
            torch.testing.assert_close(kept[name] / kept[name].norm(), raw[name] / raw[name].norm())
    with pytest.raises(ValueError):
        filter_normalize(raw, w, ignore="bn")


def test_plane_coordinates_are_the_least_squares_projection():
    g = torch.Generator().manual_seed(0)
    origin = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    dirs = [{n: torch.randn(t.shape, generator=g) for n, t in origin.items()} for _ in range(2)]
    dirs[1].pop("b")  # a missing name is a zero entry
    points = [{n: torch.randn(t.shape, generator=g) for n, t in origin.items()} for _ in range(6)]
    got = plane_coordinates(points, origin, dirs)

    def vec(d):
        return torch.cat([d["a"].reshape(-1), d.get("b", torch.zeros(5))]).double()

    A = torch.stack([vec(d) for d in dirs], 1)  # (P, 2)
    B = torch.stack([vec(p) - vec(origin) for p in points], 1)  # (P, 6)
    torch.testing.assert_close(got, torch.linalg.lstsq(A, B).solution.T)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    cfg = RunConfig.for_workload("mnist1d-cnn", workload_options={"width": 4}, steps=6, lr=0.05, batch_size=32,
                                 eval_every=6, record=RecordConfig(checkpoint_every=0, sketch_dim=0))
    return Trainer(cfg, root=tmp_path_factory.mktemp("runs"), progress=False).fit()["path"]


def _direct(traj, step, dirs, coeffs, batch):
    """Reference: the workload's model, loaded snapshot by snapshot, in a load_state_dict loop."""
    from trajscope import workloads

    wl = workloads.get("mnist1d-cnn")
    model = wl.make_model({"width": 4})
    origin = {n: t for n, t in traj.snapshot(step).items()}
    return evaluate_points_reference(model, wl.loss_fn, batch, origin, dirs, coeffs)


def test_pca_plane_of_a_run(cnn_run):
    out = landscape(cnn_run, plane="pca", steps=5, batch_size=64, progress=False)
    assert out["plane"] == "pca" and out["points"] == 26 and out["n_examples"] == 64
    with Run.open(cnn_run) as run:
        data, t = run.load_result("landscape-pca")
    assert data["center_step"] == 6 and t["losses"].shape == (5, 5)
    with Trajectory.open(cnn_run) as traj:
        dirs = pca_directions(traj, trajectory_pca(traj, "all", exact=True, n_components=2), "all", 2)
        steps = traj.snapshot_steps
        assert t["coord_steps"].tolist() == steps.tolist()
        final = traj.vector(6, traj.group("all"), torch.float64)
        A = torch.stack([torch.cat([d[n].reshape(-1) for n in traj.group("all").tensors]).double() for d in dirs], 1)
        B = torch.stack([traj.vector(int(s), traj.group("all"), torch.float64) - final for s in steps], 1)
        torch.testing.assert_close(t["coords"], torch.linalg.lstsq(A, B).solution.T, rtol=1e-6, atol=1e-7)
        from trajscope import workloads

        x = workloads.get("mnist1d-cnn").make_data(0, {})  # the run's seed
        coeffs = grid_coefficients(t["alphas"], t["betas"])[[0, 7, 24]]
        want, acc = _direct(traj, 6, dirs, coeffs, (x.x_train[:64], x.y_train[:64]))
    torch.testing.assert_close(t["losses"].reshape(-1)[[0, 7, 24]], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["accuracies"].reshape(-1)[[0, 7, 24]], acc)
    # the trajectory lies inside the default box
    assert (t["coords"][:, 0] >= t["alphas"][0]).all() and (t["coords"][:, 0] <= t["alphas"][-1]).all()


def test_random_plane_and_line_of_a_run(cnn_run):
    out = landscape(cnn_run, plane="random", steps=3, span=0.5, data="train", batch_size=2000, progress=False)
    assert out["span"] == [-0.5, 0.5, -0.5, 0.5] and out["n_examples"] == 4000
    with Run.open(cnn_run) as run:
        _, t = run.load_result("landscape-random")
        assert t["losses"][1, 1] == pytest.approx(out["loss_center"], rel=1e-6)  # (0, 0) is the center
    line = line_slice(cnn_run, steps=5, batch_size=64, progress=False)
    assert (line["start_step"], line["end_step"]) == (0, 6)
    with Run.open(cnn_run) as run:
        _, t = run.load_result("landscape-line")
    torch.testing.assert_close(t["alphas"], torch.linspace(-0.5, 1.5, 5, dtype=torch.float64))
    assert t["losses"][1] == pytest.approx(line["loss_start"], rel=1e-5)  # alpha = 0
    assert t["losses"][3] == pytest.approx(line["loss_end"], rel=1e-5)  # alpha = 1
    assert line["barrier"] >= t["losses"][2] - (line["loss_start"] + line["loss_end"]) / 2 - 1e-9


class _Tied(nn.Module):
    """A first Linear layer (replayed: it reads the data) whose weight is used again further on."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.first(x))
        return self.out(torch.relu(F.linear(h, self.first.weight)))


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
    cnn = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 3, 5, padding=2), nn.BatchNorm1d(3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(18, 4))
    return {"mlp": mlp, "cnn": cnn, "tied": _Tied(), "linear": nn.Linear(6, 4)}


@pytest.mark.parametrize("name", ["mlp", "cnn", "tied", "linear"])
@pytest.mark.parametrize("k", [1, 2])
def test_loop_replays_input_layers_and_matches_the_reference(name, k):
    from trajscope.landscape.grid import _stack
    from trajscope.landscape.loop import Looped

    model = _models()[name]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in (9, 5)]
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    dirs = [random_direction(origin, g, ignore=None) for _ in range(k)]
    coeffs = grid_coefficients(*[torch.linspace(-1, 1, 4)] * k)
    looped = Looped(model, F.cross_entropy, origin, _stack(origin, dirs), True, batches)
    assert len(looped.replays) == 1  # the layer reading the data (fan-in 6, or 1 x 5 for the conv)
    loss, hits = zip(*[looped(coeffs[a:a + 3], batches) for a in range(0, len(coeffs), 3)])
    want = evaluate_points_reference(model, F.cross_entropy, batches, origin, dirs, coeffs)
    torch.testing.assert_close(torch.cat(loss) / 14, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(hits) / 14, want[1])
    assert len(looped.replays) == 1  # the check at the first point kept it


def test_loop_drops_a_replay_that_does_not_match():
    from trajscope.landscape.grid import _stack
    from trajscope.landscape.loop import Looped

    class Scaled(nn.Module):  # the layer's input depends on a parameter without a gradient path
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(6))
            self.lin = nn.Linear(6, 4)

        def forward(self, x):
            return self.lin(x * (self.s.detach() > 0.5))

    torch.manual_seed(0)
    model = Scaled()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g))
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    dirs = [{n: torch.randn(p.shape, generator=g) for n, p in origin.items()}]
    coeffs = torch.tensor([[-1.0], [0.3], [0.0], [1.0]], dtype=torch.float64)
    looped = Looped(model, F.cross_entropy, origin, _stack(origin, dirs), True, [batch])
    assert len(looped.replays) == 1  # s.detach(): no grad reaches the input, so it looks replayable
    got = looped(coeffs, [batch])
    want = evaluate_points_reference(model, F.cross_entropy, [batch], origin, dirs, coeffs)
    assert looped.replays == []
    torch.testing.assert_close(got[0] / 10, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1] / 10, want[1])


@pytest.mark.parametrize("fn", [evaluate_points, evaluate_points_reference])
def test_no_direction_or_mismatched_coefficients_is_a_clear_error(fn):
    from trajscope.errors import UsageError

    model = _cnn()
    x, y = torch.randn(5, 1, 6), torch.randint(0, 4, (5,))
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UsageError, match="at least one direction"):
        fn(model, F.cross_entropy, (x, y), origin, [], torch.zeros(3, 0))
    d = random_direction(origin, torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match=r"shape \(points, 1\)"):
        fn(model, F.cross_entropy, (x, y), origin, [d], torch.zeros(3, 2))


def test_loop_runs_only_safe_relus_in_place_and_leaves_data_and_model_alone():
    from trajscope.landscape.loop import Looped, _inplace_relus

    torch.manual_seed(0)
    shared = nn.ReLU()
    model = nn.Sequential(nn.Identity(), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), shared,
                          nn.Linear(8, 8), shared, nn.Linear(8, 3))
    assert _inplace_relus(model) == [model[3]]  # not after Identity (a view of the data), not shared
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    x0 = x.clone()
    origin = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    dirs = [random_direction(origin, g), random_direction(origin, g)]
    coeffs = grid_coefficients(torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 3))
    got = evaluate_points(model, F.cross_entropy, (x, y), origin, dirs, coeffs, strategy="loop")
    want = evaluate_points_reference(model, F.cross_entropy, (x, y), origin, dirs, coeffs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(x, x0) and not any(m.inplace for m in model if isinstance(m, nn.ReLU))
    loop = Looped(model, F.cross_entropy, origin, {n: torch.stack([d[n] for d in dirs]) for n in origin}, True,
                  [(x, y)])
    assert [m.inplace for m in loop.relus] == [True]
