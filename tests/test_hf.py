"""The Hugging Face callback records a transformers.Trainer run: a tiny GPT-2 built from a config
(random weights, nothing downloaded) trained for a few steps on generated tokens.

The Trainer's own log (``logging_steps=1``) is the reference for the loss, the learning rate and
the (pre-clipping) gradient norm of each step; the recorded snapshots are the reference for the
update norms, the sketches and the final parameters.
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trajscope.functional.sketch import Sketcher  # noqa: E402
from trajscope.integrations.hf import TrajscopeCallback  # noqa: E402
from trajscope.config import RecordConfig  # noqa: E402
from trajscope.store import Run  # noqa: E402

STEPS, BATCH, ACC, SEQ, VOCAB, CLIP = 6, 4, 2, 16, 64, 1.0


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, labels = inputs (causal LM; the model shifts them)."""

    def __init__(self, n: int, seed: int):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    args = transformers.TrainingArguments(
        output_dir=str(tmp / "out"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACC, learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=2,
        max_grad_norm=CLIP, logging_steps=1, eval_strategy="steps", eval_steps=3, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    model = _model()
    cb = TrajscopeCallback(tmp / "runs", record=RecordConfig(sketch_dim=128, grads=True))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(64, 1), eval_dataset=Tokens(16, 2),
                                   callbacks=[cb])
    trainer.train()
    return cb, trainer, model, Run.open(cb.session.run.path)


def _log(trainer, key):
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


def test_run_holds_the_scalars_of_every_optimizer_step(trained):
    cb, trainer, _, r = trained
    assert r.status == "finished" and r.config["integration"] == "hf"
    assert r.config["training"]["gradient_accumulation_steps"] == ACC
    wide = r.scalars(wide=True)
    assert wide.index.tolist() == list(range(STEPS + 1))
    assert {"loss", "lr", "grad_norm", "update_norm", "param_norm", "val_loss"} <= set(wide.columns)
    loss, lr, gnorm = _log(trainer, "loss"), _log(trainer, "learning_rate"), _log(trainer, "grad_norm")
    assert sorted(loss) == list(range(1, STEPS + 1))
    for t in range(1, STEPS + 1):
        # the step's mean token loss over both micro-batches (the Trainer logs it to 4 digits at most)
        assert wide.loc[t, "loss"] == pytest.approx(loss[t], abs=1e-4)
        assert wide.loc[t, "lr"] == pytest.approx(lr[t], rel=1e-6)
        # recorded after clipping: clip_grad_norm_ scales by CLIP / (norm + 1e-6) when norm > CLIP
        expect = gnorm[t] * min(1.0, CLIP / (gnorm[t] + 1e-6))
        assert wide.loc[t, "grad_norm"] == pytest.approx(expect, rel=1e-4)
    assert max(gnorm.values()) > CLIP  # so the clipping case is exercised
    evals = _log(trainer, "eval_loss")
    assert sorted(evals) == [3, 6]
    for t, v in evals.items():
        assert wide.loc[t, "val_loss"] == pytest.approx(v, rel=1e-6)
    assert r.meta["final"]["val_loss"] == pytest.approx(evals[6], rel=1e-6)


def test_snapshots_sketches_and_update_norms_agree(trained):
    cb, _, model, r = trained
    assert r.snapshot_steps("params") == list(range(STEPS + 1))  # dense-early: every step here
    assert r.snapshot_steps("grads") == list(range(1, STEPS + 1))
    final = r.load_snapshot(STEPS)
    named = dict(model.named_parameters())
    assert final.keys() == named.keys()  # the tied lm_head / wte weight once
    for n, p in named.items():
        torch.testing.assert_close(final[n], p.detach())
    wide = r.scalars(wide=True)
    sketcher = Sketcher(k=128, seed=0)
    steps, sketches = r.sketches()
    assert steps.tolist() == list(range(STEPS + 1))
    for t in range(STEPS + 1):
        snap = r.load_snapshot(t)
        torch.testing.assert_close(sketches[t], sketcher.sketch(snap.items()), rtol=1e-5, atol=1e-5)
        assert wide.loc[t, "param_norm"] == pytest.approx(
            math.sqrt(sum((v.double() ** 2).sum().item() for v in snap.values())), rel=1e-5)
        if t:
            prev = r.load_snapshot(t - 1)
            dist = math.sqrt(sum(((snap[n] - prev[n]).double() ** 2).sum().item() for n in snap))
            assert wide.loc[t, "update_norm"] == pytest.approx(dist, rel=1e-4)
            g = r.load_snapshot(t, "grads")
            gn = math.sqrt(sum((v.double() ** 2).sum().item() for v in g.values()))
            assert wide.loc[t, "grad_norm"] == pytest.approx(gn, rel=1e-5)


class StepCounter:
    """A stateful probe-like callback: counts the optimizer steps it saw."""

    name = "counter"

    def __init__(self):
        self.steps = 0

    def on_event(self, event, ctx):
        if event.value == "step_end":
            self.steps += 1
            ctx.run.log_scalars(ctx.step, {"counter/steps": self.steps})

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_resume_from_a_trainer_checkpoint_rerecords_the_same_steps(tmp_path):
    from trajscope.events import Callback

    class Counter(StepCounter, Callback):
        pass

    def fit(cb, resume=None):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=BATCH,
            learning_rate=3e-3, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
            seed=0, logging_steps=100)
        transformers.Trainer(model=_model(), args=args, train_dataset=Tokens(64, 1), callbacks=[cb]).train(
            resume_from_checkpoint=resume)

    first = TrajscopeCallback(tmp_path / "runs", probes=[Counter()], record="minimal")
    fit(first)
    path = first.session.run.path
    before = Run.open(path).scalars(wide=True)
    assert before.index.tolist() == list(range(STEPS + 1))

    counter = Counter()
    second = TrajscopeCallback(tmp_path / "runs", probes=[counter], record="minimal")
    fit(second, resume=str(tmp_path / "out" / "checkpoint-3"))
    assert second.session.run.path == path
    assert counter.steps == STEPS  # 3 restored from the run, then 3 more
    r = Run.open(path)
    assert r.status == "finished" and r.events()["kind"].tolist().count("resumed") == 1
    after = r.scalars(wide=True)
    assert after.index.tolist() == list(range(STEPS + 1))
    assert after["counter/steps"].tolist()[1:] == list(range(1, STEPS + 1))
    # (update_norm of the first step after the resume needs the Recorder built with
    # record_start=False to start from the restored parameters, as the Trainer's resume does too)
    # the Trainer resumes exactly (same data order, RNG and optimizer state), so the re-recorded
    # steps 4..6 equal the first recording
    torch.testing.assert_close(torch.tensor(after.values), torch.tensor(before.values), rtol=1e-5, atol=1e-6,
                               equal_nan=True)
