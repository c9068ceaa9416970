"""Dense operators of frozen convolutions: outputs and kept gradients against the unmodified frozen
model (conv1d/2d/3d, strides, padding and padding modes, dilation, groups, bias; a frozen linear
layer is left alone), the operator against the convolution on the identity basis, and every
fallback to the module's own forward."""

import copy

import pytest
import torch
from torch import nn

from trajscope import workloads
from trajscope.controllers import LoopHooks
from trajscope.controllers.freeze import FreezeController, freeze_except, kept_parameter_names
from trajscope.controllers.frozen_ops import dense_modules, dense_operator, install_frozen_ops, remove_frozen_ops
from trajscope.errors import UsageError

# float32 sums of at most a few hundred products of unit-size terms, in another order: a few ulps
# of the largest partial sum; 1e-5 relative to the largest magnitude leaves a margin of ~10x.
RTOL = 1e-5

CONVS = [
    (nn.Conv1d(3, 4, 5, stride=2, padding=2, bias=False), (3, 11)),
    (nn.Conv1d(4, 6, 3, stride=1, padding=1, dilation=2, groups=2), (4, 9)),
    (nn.Conv1d(2, 3, 4, stride=3, padding=3, padding_mode="reflect"), (2, 10)),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 6)),
    (nn.Conv2d(4, 4, (3, 2), stride=(1, 2), padding=(1, 0), groups=4, bias=False, padding_mode="circular"), (4, 5, 6)),
    (nn.Conv3d(2, 2, 2, stride=1, padding=1), (2, 3, 4, 3)),
]


def _close(a, b):
    return (a - b).abs().max().item() <= RTOL * max(b.abs().max().item(), 1.0)


@pytest.mark.parametrize("conv,in_shape", CONVS, ids=[repr(c) for c, _ in CONVS])
def test_dense_operator_is_the_convolution_on_every_basis_vector(conv, in_shape):
    torch.manual_seed(0)
    matrix, bias, out_shape = dense_operator(conv, in_shape)
    n_in = torch.Size(in_shape).numel()
    for j in range(n_in):  # slow reference: column j is the response to e_j, minus the bias map
        e = torch.zeros(n_in)
        e[j] = 1.0
        with torch.no_grad():
            col = conv(e.view(1, *in_shape)).flatten() - (0 if bias is None else bias)
        assert torch.allclose(matrix[:, j], col, atol=1e-6)
    assert tuple(conv(torch.zeros(1, *in_shape)).shape[1:]) == out_shape
    # chunked build (a cap smaller than the identity basis) gives the same matrix, bit for bit
    chunked = dense_operator(conv, in_shape, max_entries=matrix.numel())
    assert torch.equal(chunked[0], matrix)
    assert dense_operator(conv, in_shape, max_entries=matrix.numel() - 1) is None


class Net(nn.Module):
    """conv -> BatchNorm (kept) -> ReLU -> linear head (frozen) -> BatchNorm1d (kept)."""

    def __init__(self, conv, in_shape):
        super().__init__()
        self.conv = conv
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(in_shape) - 1]
        self.bn = norm(conv.out_channels)
        n_out = conv(torch.zeros(1, *in_shape)).numel()
        self.head = nn.Linear(n_out, 5)
        self.out_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.out_bn(self.head(torch.relu(self.bn(self.conv(x))).flatten(1)))


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("conv,in_shape", CONVS, ids=[repr(c) for c, _ in CONVS])
def test_outputs_and_kept_gradients_match_the_unmodified_frozen_model(conv, in_shape, input_grad):
    torch.manual_seed(1)
    plain = Net(conv, in_shape)
    kept = kept_parameter_names(plain)
    freeze_except(plain, kept)
    fast = copy.deepcopy(plain)
    assert install_frozen_ops(fast) == ["conv"]  # the frozen Linear is not touched
    x = torch.randn(8, *in_shape)
    outs, grads = [], []
    for model in (plain, fast):
        xi = x.clone().requires_grad_(input_grad)
        y = model(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad for p in model.parameters() if p.requires_grad] + ([xi.grad] if input_grad else []))
    assert dense_modules(fast) == {"conv": [list(in_shape)]}
    assert _close(outs[1], outs[0])
    assert len(grads[1]) == len(kept) + input_grad
    for g_fast, g_plain in zip(*grads):
        assert _close(g_fast, g_plain)
    assert all(p.grad is None for p in fast.parameters() if not p.requires_grad)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():  # eval mode, another batch size: the same operator
        assert _close(fast.eval()(x[:3]), plain.eval()(x[:3]))


def test_fallbacks_to_the_modules_own_forward():
    torch.manual_seed(2)
    conv = nn.Conv1d(2, 3, 3, padding=1)
    conv.requires_grad_(False)
    ref = copy.deepcopy(conv)
    install_frozen_ops(conv)
    x = torch.randn(4, 2, 6)
    assert _close(conv(x), ref(x)) and dense_modules(conv) == {"": [[2, 6]]}
    # another length: its own operator; an unbatched input or float64: the plain convolution
    x9 = torch.randn(4, 2, 9)
    assert _close(conv(x9), ref(x9)) and dense_modules(conv) == {"": [[2, 6], [2, 9]]}
    assert _close(conv(x[0]), ref(x[0]))
    # converted to float64 in place: the operators are rebuilt in float64
    assert _close(conv.double()(x.double()), ref.double()(x.double()))
    assert dense_modules(conv) == {"": [[2, 6]]} and conv.__dict__["_trajscope_frozen_op"].dense[(2, 6)].matrix.dtype == torch.float64
    # weight written in place (load_state_dict): the operator is rebuilt from the new values
    fresh = nn.Conv1d(2, 3, 3, padding=1)
    conv2 = nn.Conv1d(2, 3, 3, padding=1).requires_grad_(False)
    install_frozen_ops(conv2)
    conv2(x)
    conv2.load_state_dict(fresh.state_dict())
    assert _close(conv2(x), fresh(x).detach())
    # a parameter that trains again: the plain convolution, with its weight gradient
    conv2.weight.requires_grad_(True)
    conv2(x).sum().backward()
    assert conv2.weight.grad is not None
    # functional_call with other tensors: those tensors are used, not the stored operator
    conv2.weight.requires_grad_(False)
    other = {"weight": torch.randn(3, 2, 3), "bias": torch.zeros(3)}
    got = torch.func.functional_call(conv2, other, (x,))
    assert torch.equal(got, torch.nn.functional.conv1d(x, other["weight"], other["bias"], padding=1))
    remove_frozen_ops(conv2)
    assert "forward" not in conv2.__dict__ and dense_modules(conv2) == {}
    with pytest.raises(UsageError, match="frozen_ops must be one of dense, native"):
        install_frozen_ops(conv2, "fast")


def test_a_parameter_added_or_replaced_after_the_install_is_used():
    torch.manual_seed(3)
    x = torch.randn(4, 2, 6)
    conv = nn.Conv1d(2, 3, 3, padding=1, bias=False).requires_grad_(False)
    install_frozen_ops(conv)
    conv(x)
    # a bias where there was none: the plain convolution, bias included
    conv.bias = nn.Parameter(torch.randn(3), requires_grad=False)
    want = torch.nn.functional.conv1d(x, conv.weight, conv.bias, padding=1)
    assert torch.equal(conv(x), want)
    # the weight replaced by another Parameter object: its values, not the stored operator's
    conv.weight = nn.Parameter(torch.randn(3, 2, 3), requires_grad=False)
    assert torch.equal(conv(x), torch.nn.functional.conv1d(x, conv.weight, conv.bias, padding=1))


def test_cap_keeps_large_operators_native_and_native_mode_installs_nothing():
    conv = nn.Conv1d(32, 32, 5, stride=2, padding=2, bias=False).requires_grad_(False)
    install_frozen_ops(conv)
    conv(torch.randn(2, 32, 20))  # M would be 320 x 640 > 64 Ki entries
    assert dense_modules(conv) == {"": []}
    conv(torch.randn(2, 32, 10))  # 160 x 320 fits
    assert dense_modules(conv) == {"": [[32, 10]]}
    assert install_frozen_ops(conv, "native") == [] and dense_modules(conv) == {}


def test_freeze_controller_installs_the_dense_path_at_the_switch_and_training_matches_native():
    wl = workloads.get("mnist1d-cnn")
    data = wl.make_data(0, {"width": 8})
    runs = {}
    for mode in ("dense", "native"):
        torch.manual_seed(0)
        model = wl.make_model({"width": 8})
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ctl = FreezeController(at_step=2, frozen_ops=mode)
        hooks = LoopHooks([ctl], model, opt, loss_fn=wl.loss_fn)
        hooks.start()
        for step in range(6):
            x, y = data.x_train[32 * step:32 * step + 32], data.y_train[32 * step:32 * step + 32]
            loss = wl.loss_fn(model(x), y)
            loss.backward()
            hooks.before_optimizer_step((x, y), loss)
            opt.step()
            hooks.after_optimizer_step()
            opt.zero_grad(set_to_none=True)
        (decision,) = hooks.run.decisions("freeze")
        runs[mode] = (model, decision["data"]["evidence"])
    (dense, ev_dense), (native, ev_native) = runs["dense"], runs["native"]
    assert ev_dense["dense_candidates"] == ["features.0", "features.3", "features.6"]
    assert ev_native["dense_candidates"] == [] and ev_dense["frozen_ops"] == "dense"
    assert set(dense_modules(dense)) == {"features.0", "features.3", "features.6"}
    for (n, a), (_, b) in zip(dense.named_parameters(), native.named_parameters()):
        assert _close(a.detach(), b.detach()), n  # four kept-only updates agree to rounding
    with pytest.raises(UsageError, match="frozen_ops must be one of"):
        FreezeController(frozen_ops="fast")
