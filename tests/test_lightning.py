"""The Lightning callback records what the plain-loop Recorder records for the same run.

A real ``lightning.Trainer`` on CPU fits a LightningModule built from the ``digits-mlp`` workload
with gradient accumulation 2 (micro-batches of 16); the reference is a plain loop with
``trajscope.Recorder`` on the same effective batches of 32 from the same seed. The gradient of the
mean over 32 examples equals the sum of the two halves' means / 2 up to float32 rounding, so every
recorded number agrees to a relative 1e-5 over these few SGD steps.
"""

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import trajscope  # noqa: E402
from trajscope import workloads  # noqa: E402
from trajscope.integrations.lightning import TrajscopeCallback  # noqa: E402
from trajscope.train.trainer import recorder_for  # noqa: E402
from trajscope.config import RecordConfig  # noqa: E402
from trajscope.events import Event, StepContext  # noqa: E402
from trajscope.probes.noise import NoiseProbe  # noqa: E402
from trajscope.store import Run, list_runs  # noqa: E402

SEED, MICRO, ACC, PER_EPOCH, STEPS, LR, NOISE_EVERY = 0, 16, 2, 6, 12, 0.05, 4
RECORD = RecordConfig(snapshots="every", snapshot_every=4, grads=True, sketch_dim=64)


def _batches():
    """The effective batches of one epoch (the same every epoch): PER_EPOCH index sets of 32."""
    perm = torch.randperm(1437, generator=torch.Generator().manual_seed(SEED))
    return [perm[i * MICRO * ACC:(i + 1) * MICRO * ACC] for i in range(PER_EPOCH)]


def _model():
    torch.manual_seed(SEED)
    return workloads.get("digits-mlp").make_model({"width": 32})


class DigitsModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = _model()
        self.wl = workloads.get("digits-mlp")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.wl.loss_fn(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.wl.loss_fn(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9)


def _loaders(data):
    ds = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    micro = [b[j * MICRO:(j + 1) * MICRO].tolist() for b in _batches() for j in range(ACC)]
    val = torch.utils.data.TensorDataset(data.x_val, data.y_val)
    return (torch.utils.data.DataLoader(ds, batch_sampler=micro),
            torch.utils.data.DataLoader(val, batch_size=360))


def _trainer(tmp_path, cb, steps=STEPS, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=ACC, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(tmp_path), callbacks=[cb], **kw)


@pytest.fixture(scope="module")
def data():
    return workloads.get("digits-mlp").make_data(SEED, {})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The plain loop: the same model, optimizer and effective batches, recorded by the Recorder."""
    root = tmp_path_factory.mktemp("plain")
    model, wl = _model(), workloads.get("digits-mlp")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    run = Run.create(root, config={"plain": True}, seed=SEED)
    rec = recorder_for(model, run, RECORD)
    probe = NoiseProbe(every=NOISE_EVERY, top_k=0)
    batches = _batches()
    for t in range(1, STEPS + 1):
        idx = batches[(t - 1) % PER_EPOCH]
        opt.zero_grad()
        loss = wl.loss_fn(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        rec.step(loss=loss, optimizer=opt)
        ctx = StepContext({}, run, model, opt, wl, data, step=t, batch=(data.x_train[idx], data.y_train[idx]))
        probe.on_event(Event.STEP_END, ctx)  # measured on the whole effective batch, at theta_t
    rec.close()
    return Run.open(run.path)


def _assert_same_run(r: Run, ref: Run, probes: bool = False):
    want = ref.scalars(wide=True)
    if not probes:
        want = want[[c for c in want.columns if not c.startswith("noise/")]]
    got = r.scalars(list(want.columns), wide=True)
    assert got.index.tolist() == list(range(STEPS + 1))
    assert sorted(got.columns) == sorted(want.columns)
    for col in want.columns:
        torch.testing.assert_close(torch.tensor(got[col].values), torch.tensor(want[col].values), rtol=1e-5,
                                   atol=1e-6, equal_nan=True, msg=col)
    steps_g, sk_g = r.sketches()
    steps_w, sk_w = ref.sketches()
    assert steps_g.tolist() == steps_w.tolist() == list(range(STEPS + 1))
    torch.testing.assert_close(sk_g, sk_w, rtol=1e-5, atol=1e-5)
    for kind in ("params", "grads"):
        assert r.snapshot_steps(kind) == ref.snapshot_steps(kind) and r.snapshot_steps(kind)
        for step in ref.snapshot_steps(kind):
            a, b = r.load_snapshot(step, kind), ref.load_snapshot(step, kind)
            assert a.keys() == b.keys()
            for name in b:
                torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{kind} {step} {name}")


def test_lightning_with_accumulation_records_the_plain_loop_run(tmp_path, data, reference):
    train, val = _loaders(data)
    run = Run.create(tmp_path / "runs", config={"lightning": True}, seed=SEED)
    cb = TrajscopeCallback(run, probes=[f"noise:every={NOISE_EVERY},top_k=0"], record=RECORD, module="model",
                           workload="digits-mlp")
    trainer = _trainer(tmp_path, cb, check_val_every_n_epoch=1)
    trainer.fit(DigitsModule(), train, val)
    assert trainer.global_step == STEPS
    r = Run.open(run.path)
    assert r.status == "finished"
    noise = r.scalars(["noise/b_simple"], wide=True)["noise/b_simple"].dropna()
    assert noise.index.tolist() == list(range(NOISE_EVERY, STEPS + 1, NOISE_EVERY))
    _assert_same_run(r, reference, probes=True)  # the probe saw the whole effective batch
    # validation after each epoch (steps 6 and 12), stored at the step it followed
    val_loss = r.scalars(["val_loss"], wide=True)["val_loss"].dropna()
    assert val_loss.index.tolist() == [PER_EPOCH, 2 * PER_EPOCH]
    assert r.meta["final"]["val_loss"] == pytest.approx(float(val_loss.iloc[-1]))


class CountingProbe(trajscope.events.Callback):
    """A probe with state: counts the steps it saw and the examples in their batches."""

    name = "count"

    def __init__(self):
        self.steps, self.examples = 0, 0

    def on_step_end(self, ctx):
        self.steps += 1
        self.examples += len(ctx.batch[0])
        ctx.run.log_scalars(ctx.step, {"count/steps": self.steps})

    def state_dict(self):
        return {"steps": self.steps, "examples": self.examples}

    def load_state_dict(self, state):
        self.steps, self.examples = state["steps"], state["examples"]


class ExampleCounter(pl.Callback):
    """Counts the training examples Lightning feeds (all micro-batches)."""

    def __init__(self):
        self.examples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.examples += len(batch[0])


def test_resume_from_a_lightning_checkpoint_continues_the_run(tmp_path, data, reference):
    train, _ = _loaders(data)
    root = tmp_path / "runs"
    record = RECORD.model_copy(update={"snapshot_every": 1})
    first = TrajscopeCallback(root, probes=[CountingProbe()], record=record, module="model")
    trainer = _trainer(tmp_path, first, steps=PER_EPOCH)
    trainer.fit(DigitsModule(), train)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)  # holds the callback's state_dict
    assert torch.load(ckpt, weights_only=False)["global_step"] == PER_EPOCH

    probe, counter = CountingProbe(), ExampleCounter()
    second = TrajscopeCallback(root, probes=[probe], record=record, module="model")
    module = DigitsModule()
    # the same config as the first run, so the callback names the same run, and resumes it
    trainer = _trainer(tmp_path, second)
    trainer.callbacks.append(counter)
    trainer.fit(module, train, ckpt_path=str(ckpt))
    assert probe.steps == STEPS  # PER_EPOCH restored from the checkpoint, then one per optimizer step
    # Lightning itself replays the data differently after this resume (it finishes the restored
    # epoch with one extra micro-batch), so the examples are what it fed, not the reference's.
    assert probe.examples == PER_EPOCH * MICRO * ACC + counter.examples
    r = Run.open(second.session.run.path)
    assert r.id == first.session.run.id and r.status == "finished"
    assert r.events()["kind"].tolist().count("resumed") == 1
    wide = r.scalars(wide=True)
    assert wide.index.tolist() == list(range(STEPS + 1))
    counts = wide["count/steps"].dropna()
    assert counts.index.tolist() == counts.tolist() == list(range(1, STEPS + 1))
    ref = reference.scalars(wide=True)  # before the checkpoint: the first fit's records, untouched
    for col in (c for c in ref.columns if not c.startswith("noise/")):
        torch.testing.assert_close(torch.tensor(wide[col].values[:PER_EPOCH + 1]),
                                   torch.tensor(ref[col].values[:PER_EPOCH + 1]), rtol=1e-5, atol=1e-6,
                                   equal_nan=True, msg=col)
    # after it: one record per optimizer step, consistent with the parameters Lightning produced
    assert r.snapshot_steps("params") == list(range(STEPS + 1))
    final = r.load_snapshot(STEPS)
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(final[name], p.detach())
    # (update_norm of the first step after the resume needs the Recorder built with
    # record_start=False to start from the restored parameters, as the Trainer's resume does too)
    for t in range(PER_EPOCH + 1, STEPS + 1):
        a, b = r.load_snapshot(t), r.load_snapshot(t - 1)
        dist = torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a)).item()
        assert wide.loc[t, "update_norm"] == pytest.approx(dist, rel=1e-5)


def test_diverged_loss_stops_training_and_keeps_the_run(tmp_path, data):
    class Bomb(DigitsModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 3 else loss

    train, _ = _loaders(data)
    cb = TrajscopeCallback(tmp_path / "runs", record="minimal", module="model")
    trainer = _trainer(tmp_path, cb)
    trainer.fit(Bomb(), train)
    assert trainer.global_step < STEPS  # stopped early, no exception
    r = Run.open(cb.session.run.path)
    assert r.status == "diverged" and r.meta["status_step"] == 4
    assert r.scalars(["param_norm"], wide=True).index.tolist() == [0, 1, 2, 3]


class RankModule(DigitsModule):
    """Each of the ranks trains on its share of every effective batch (so the global batch is 32)."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def train_dataloader(self):
        r, w = self.global_rank, self.trainer.world_size
        share = MICRO * ACC // w
        ds = torch.utils.data.TensorDataset(self.data.x_train, self.data.y_train)
        return torch.utils.data.DataLoader(ds, batch_sampler=[b[r * share:(r + 1) * share].tolist() for b in _batches()])


def test_two_process_ddp_records_the_plain_loop_run(tmp_path, data, reference):
    root = tmp_path / "runs"
    cb = TrajscopeCallback(root, record=RECORD, module="model")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", max_steps=STEPS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         use_distributed_sampler=False, default_root_dir=str(tmp_path), callbacks=[cb])
    trainer.fit(RankModule(data))
    (info,) = list_runs(root)  # rank 0 wrote the one run
    r = Run.open(info.path)
    assert r.status == "finished" and r.config["integration"] == "lightning"
    _assert_same_run(r, reference)  # loss averaged over ranks, gradients averaged by DDP


def test_bad_run_argument_is_a_one_line_error():
    with pytest.raises(trajscope.TrajscopeError, match="run must be a trajscope Run or a store root"):
        TrajscopeCallback(run=42)
    with pytest.raises(trajscope.TrajscopeError, match="unknown probe"):
        TrajscopeCallback("runs", probes=["no-such-probe"])
