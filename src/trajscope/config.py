"""Run configuration: frozen pydantic models whose canonical JSON (defaults included) names a run.

A run's id is a hash of ``RunConfig.model_dump(mode="json")`` plus its seed
(:func:`trajscope.store.run_id_for`), so the same config always maps to the same directory, and
every default is stored with the run, so old runs stay readable when defaults change.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trajscope.errors import UsageError, unknown_choice

OPTIMIZERS = ("sgd", "adam", "adamw", "muon", "prodigy", "schedulefree")
SCHEDULES = ("constant", "warmup-cosine", "step", "exp")
RECORD_PRESETS = ("default", "minimal", "full", "none")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RecordConfig(_Frozen):
    """What the recorder writes, each on its own schedule (steps count optimizer steps; 0 = init).

    ``snapshots``: ``dense-early`` (every step up to ``snapshot_dense``, then ``snapshot_per_decade``
    log-spaced per factor of 10), ``log`` (log-spaced only), ``every`` (every ``snapshot_every``
    steps) or ``none``. ``grads``, ``optimizer_state`` and ``buffers`` follow the snapshot schedule.
    ``sketch_dim`` 0 turns the per-step sketch off. ``checkpoint_every``: full checkpoints (model,
    optimizer, RNG) every so many steps and at the last step; None picks a tenth of the run, 0 never.
    """

    scalars_every: int = Field(1, ge=1)
    snapshots: Literal["dense-early", "log", "every", "none"] = "dense-early"
    snapshot_dense: int = Field(100, ge=0)
    snapshot_per_decade: int = Field(20, ge=1)
    snapshot_every: int = Field(100, ge=1)
    params: tuple[str, ...] | None = None
    sketch_dim: int = Field(1024, ge=0)
    sketch_seed: int = 0
    grads: bool = False
    optimizer_state: bool = False
    buffers: bool = False
    checkpoint_every: int | None = Field(None, ge=0)

    @classmethod
    def preset(cls, name: str) -> "RecordConfig":
        """``default``: scalars, sketch every step, snapshots dense-early; ``minimal``: scalars only;
        ``full``: default plus gradients, optimizer state and buffers; ``none``: eval metrics only."""
        presets = {
            "default": {},
            "minimal": {"snapshots": "none", "sketch_dim": 0},
            "full": {"grads": True, "optimizer_state": True, "buffers": True},
            "none": {"snapshots": "none", "sketch_dim": 0, "checkpoint_every": 0},
        }
        if name not in presets:
            raise unknown_choice("record preset", name, presets)
        return cls(**presets[name])


class CallbackSpec(_Frozen):
    """A probe or controller of a run, by registered ``kind`` (``trajscope.probes.REGISTRY`` or
    ``trajscope.controllers.REGISTRY``): built as ``cls(name=name, every=every, **options)``
    (``every`` only where given). Part of the run's config, so it names the run."""

    kind: str
    name: str | None = None
    every: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "CallbackSpec":
        """``KIND[:key=value,key=value]`` (values as JSON where they parse, else strings), e.g.
        ``sharpness:every=16,k=1``; the keys ``name`` and ``every`` fill those fields."""
        import json

        kind, _, rest = text.partition(":")
        values: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            if "=" not in item:
                raise UsageError(f"{text!r}: expected KIND:key=value,..., got {item!r}")
            key, raw = item.split("=", 1)
            try:
                values[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                values[key.strip()] = raw
        name, every = values.pop("name", None), values.pop("every", None)
        return validated(cls, {"kind": kind.strip(), "name": name, "every": every, "options": values})


class RunConfig(_Frozen):
    """One training run of a workload. Learning rates are per optimizer step; ``steps`` counts them.

    ``probes`` and ``controllers`` are :class:`CallbackSpec` entries that the trainer builds from
    their registries (probes first, then controllers, then the caller's own callbacks).
    """

    workload: str
    workload_options: dict[str, Any] = Field(default_factory=dict)
    optimizer: Literal["sgd", "adam", "adamw", "muon", "prodigy", "schedulefree"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    steps: int = Field(1000, ge=0)
    schedule: Literal["constant", "warmup-cosine", "step", "exp"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    step_every: int = Field(1000, ge=1)
    step_gamma: float = Field(0.1, gt=0)
    exp_growth: float = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1)
    seed: int = 0
    record: RecordConfig = Field(default_factory=RecordConfig)
    probes: tuple[CallbackSpec, ...] = ()
    controllers: tuple[CallbackSpec, ...] = ()

    @model_validator(mode="after")
    def _check(self):
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer sgd with momentum > 0")
        return self

    @classmethod
    def for_workload(cls, workload: str, **overrides: Any) -> "RunConfig":
        """The workload's defaults, then ``overrides`` (None values are ignored)."""
        from trajscope import workloads

        w = workloads.get(workload)
        values = {**dict(w.defaults), **{k: v for k, v in overrides.items() if v is not None}}
        values["workload"] = workload
        if "workload_options" in values:
            values["workload_options"] = w.resolve_options(values["workload_options"])
        else:
            values["workload_options"] = w.resolve_options({})
        if values.get("optimizer") is not None and values["optimizer"] not in OPTIMIZERS:
            raise unknown_choice("optimizer", values["optimizer"], OPTIMIZERS)
        if values.get("schedule") is not None and values["schedule"] not in SCHEDULES:
            raise unknown_choice("schedule", values["schedule"], SCHEDULES)
        return validated(cls, values)


def validated(model: type[BaseModel], values: dict) -> Any:
    """Build ``model(**values)``; a validation error becomes a one-line UsageError."""
    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or model.__name__
        raise UsageError(f"invalid {where}: {err['msg']}") from None
