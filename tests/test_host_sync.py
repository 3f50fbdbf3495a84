"""The training step does not synchronise the host with the device, except where it must.

A read of a GPU tensor on the host (`float(t)`, `t.item()`, `if t:`, `t.tolist()`, `t.cpu()`), an
operation whose output size depends on the data (`nonzero`, boolean-mask indexing, `unique`,
`bincount`), a Python list used as an index, or a blocking host-to-device copy makes the host wait
until the device has run everything queued before it. On the CPU nothing waits, so these are counted
instead: `DeviceSyncCounter` runs the training loop under a torch function mode that follows which
tensors live on the training device, with the device stood in for by ``cpu:0`` (`TRAIN`; the trainer
moves its batches with ``.to(accelerator.device)``, so they carry it, and everything computed from a
device tensor is one), and counts every synchronising call on them. Host tensors (the CPU batch
before it moves, the mining bank and queue, optimizer step counters) are not counted.

Allowed per optimizer step: one read of the metrics (with the gradient norm); with mining one
device-to-host copy of the pooled queries per micro-batch (the search runs on the host); with
refinement, per attacked micro-batch, one copy of the attacked samples' queries and, when the
perturbation is optimised, one read of the clean states' scale (Adam's learning rate).
"""

from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from crl.models import build_tiny_llama
from crl.training.config import load_train_config
from crl.training.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
TRAIN = torch.device("cpu", 0)
"""Stands for the GPU: the trainer's device in these tests."""

_MARK = "_crl_on_device"
_DEVICE_GETTER = torch._C.TensorBase.__dict__["device"]
T = torch.Tensor
_READS = {T.item, T.tolist, T.numpy, T.__bool__, T.__float__, T.__int__, T.__index__, T.__complex__, T.__array__,
          T.__repr__, T.__format__, T.is_nonzero, T.equal, T.allclose}
_DATA_DEPENDENT = {T.nonzero, T.argwhere, T.masked_select, T.unique, T.unique_consecutive, T.bincount,
                   torch.nonzero, torch.argwhere, torch.masked_select, torch.unique, torch.unique_consecutive,
                   torch.bincount, torch.is_nonzero, torch.equal, torch.allclose}
_FROM_HOST_DATA = {torch.tensor, torch.as_tensor, T.new_tensor}


def _marked(x) -> bool:
    return isinstance(x, torch.Tensor) and getattr(x, _MARK, False)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def mark(*tensors) -> None:
    """Declare tensors (model parameters, buffers) to live on the training device."""
    for t in tensors:
        setattr(t, _MARK, True)


def _target(args, kwargs):
    """(kind, non_blocking) of a `.to(...)` call: kind "device", "host" or None (no device change)."""
    device, non_blocking = kwargs.get("device"), bool(kwargs.get("non_blocking", False))
    for a in args:
        if isinstance(a, torch.Tensor):
            return ("device" if _marked(a) else "host"), non_blocking
        if isinstance(a, (torch.device, str)):
            device = a
        elif isinstance(a, bool):
            non_blocking = a
    if device is None:
        return None, non_blocking
    device = torch.device(device)
    return ("device" if device.type != "cpu" or device.index is not None else "host"), non_blocking


def _index_syncs(index, self_marked: bool) -> bool:
    """Whether indexing with `index` synchronises: a boolean tensor (a nonzero), or, on a device
    tensor, a Python list or a host tensor (copied to the device with a blocking copy)."""
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.dtype == torch.bool and (self_marked or _marked(item)):
                return True
            if self_marked and not _marked(item) and item.dim() > 0:
                return True
        elif isinstance(item, list) and self_marked:
            return True
    return False


class DeviceSyncCounter(TorchFunctionMode):
    """Counts host synchronisations on training-device tensors (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = True
        self.events: list[tuple[str, str]] = []

    def __enter__(self):
        # nn.Parameter(data) makes its object in C++, unseen by the mode: it lives where its data does
        self._parameter_new = torch.nn.Parameter.__dict__["__new__"]
        real = self._parameter_new.__func__ if isinstance(self._parameter_new, staticmethod) else self._parameter_new

        def parameter_new(cls, data=None, requires_grad=True):
            param = real(cls, data, requires_grad)
            if _marked(data):
                mark(param)
            return param

        torch.nn.Parameter.__new__ = parameter_new
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__new__ = self._parameter_new
        return super().__exit__(*exc)

    def _count(self, kind: str) -> None:
        if not self.counting:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "/crl/" in f.filename or "/tests/" in f.filename]
        site = "?"
        if frames:
            f = frames[-1]
            site = f"{f.filename.split('/crl/')[-1].split('/tests/')[-1]}:{f.lineno} ({f.name})"
        self.events.append((kind, site))

    @property
    def total(self) -> int:
        return len(self.events)

    def sites(self) -> Counter:
        return Counter(self.events)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is _DEVICE_GETTER:  # tensor.device
            return TRAIN if _marked(args[0]) else func(*args, **kwargs)
        inputs_marked = any(_marked(t) for t in _tensors((args, kwargs)))
        self_marked = bool(args) and _marked(args[0])
        out_marked = inputs_marked
        to_host = False
        if func in _READS:
            if self_marked:
                self._count(f"read {func.__name__}")
            return func(*args, **kwargs)
        if func in _DATA_DEPENDENT and inputs_marked:
            self._count(f"data-dependent {func.__name__}")
        elif func is torch.where and len(args) == 1 and inputs_marked:
            self._count("data-dependent where(condition)")
        elif func in (T.repeat_interleave, torch.repeat_interleave) and inputs_marked:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
                self._count("data-dependent repeat_interleave")
        elif func is T.__getitem__ and _index_syncs(args[1], self_marked):
            self._count("index (boolean mask or host index)")
        elif func is T.__setitem__:
            value = args[2]
            if _index_syncs(args[1], self_marked) and not (
                isinstance(value, (int, float, bool)) and isinstance(args[1], torch.Tensor)
            ):
                self._count("index assignment (boolean mask or host index)")
        elif func is T.to:
            kind, non_blocking = _target(args[1:], kwargs)
            if kind == "host":
                to_host, out_marked = True, False
                if self_marked:
                    self._count("device-to-host copy (to)")
            elif kind == "device":
                out_marked = True
                if not self_marked and not non_blocking:
                    self._count("blocking host-to-device copy (to)")
        elif func is T.cpu:
            to_host, out_marked = True, False
            if self_marked:
                self._count("device-to-host copy (cpu)")
        elif func is T.copy_:
            if self_marked != _marked(args[1]) and not (len(args) > 2 and args[2]) and not kwargs.get("non_blocking"):
                self._count("blocking copy between host and device (copy_)")
        elif func in _FROM_HOST_DATA:
            device = kwargs.get("device")
            target = torch.device(device) if device is not None else (TRAIN if func is T.new_tensor and self_marked else None)
            data = args[1] if func is T.new_tensor else (args[0] if args else kwargs.get("data"))
            if target is not None and (target.type != "cpu" or target.index is not None):
                out_marked = True
                if not _marked(data):
                    self._count(f"blocking host-to-device copy ({func.__name__})")
        else:
            device = kwargs.get("device")
            if device is not None:
                device = torch.device(device)
                out_marked = device.type != "cpu" or device.index is not None
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and args and out is args[0] and (to_host or (out_marked and not self_marked)):
            out = out.detach()  # a no-op move on the CPU: a separate tensor, so that the source keeps its place
        if out_marked:
            for t in _tensors(out):
                mark(t)
        return out


def mark_trainer(trainer: Trainer) -> None:
    """The trainer's device state: the model's parameters and buffers, the refiner's perturbations."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    mark(*model.parameters(), *model.buffers())
    if trainer.refiner is not None:
        for pert in trainer.refiner.perturbations.values():
            mark(*pert.parameters(), *pert.buffers())


def _grouping_on_train_device(real):
    """torch's grouping of tensors by device (gradient clipping, foreach optimizers) reads devices in
    C++, where TRAIN's tensors are on "cpu": report the groups of device tensors on TRAIN."""

    def group(tensorlistlist, with_indices=False):
        out = real(tensorlistlist, with_indices)
        fixed = {}
        for (device, dtype), value in out.items():
            if device is not None and device.type == "cpu" and any(_marked(t) for t in value[0][0] if t is not None):
                device = TRAIN
            fixed[(device, dtype)] = value
        return fixed

    return group


@contextmanager
def on_train_device_patches():
    """While inside, accelerate's Accelerator reports TRAIN as its device (usable outside pytest, e.g.
    by the multi-process workers of test_distributed.py)."""
    import importlib

    from accelerate import Accelerator

    saved = [(Accelerator, "device", Accelerator.__dict__["device"])]
    Accelerator.device = property(lambda self: TRAIN)
    for name in ("torch.nn.utils.clip_grad", "torch.optim.optimizer"):
        module = importlib.import_module(name)
        real = getattr(module, "_group_tensors_by_device_and_dtype", None)
        if real is not None:
            saved.append((module, "_group_tensors_by_device_and_dtype", real))
            module._group_tensors_by_device_and_dtype = _grouping_on_train_device(real)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@pytest.fixture
def on_train_device():
    with on_train_device_patches():
        yield


def count_training_syncs(trainer: Trainer, max_steps: int | None = None) -> DeviceSyncCounter:
    """Run `trainer.train(max_steps)` under the counter (built under `on_train_device_patches`);
    checkpoints and the final export are not counted."""
    mark_trainer(trainer)
    counter = DeviceSyncCounter()

    def paused(method):
        def run(*args, **kwargs):
            counter.counting = False
            try:
                return method(*args, **kwargs)
            finally:
                counter.counting = True

        return run

    trainer._checkpoint = paused(trainer._checkpoint)
    trainer._finish = paused(trainer._finish)
    with counter:
        trainer.train(max_steps=max_steps)
    return counter


@pytest.fixture(scope="module")
def pools_dir(make_toy_pools) -> Path:
    return make_toy_pools(8, 8, 2)


def _config(pools: Path, *sets: str):
    base = [f'data.pools="{pools}"', "optim.max_steps=3", "run.checkpoint_every=100", "lora.dropout=0.1",
            "optim.grad_accumulation=2"]
    return load_train_config(REPO / "configs" / "tiny.toml", [*base, *sets])


def count_syncs(config, out: Path, *, wrap=None) -> tuple[DeviceSyncCounter, Trainer]:
    """Train `config` on the tiny model under the counter."""
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_llama(seed=0)
    trainer = Trainer(config, out, model=model, tokenizer=tokenizer)
    if wrap is not None:
        wrap(trainer)
    return count_training_syncs(trainer), trainer


def _report(counter: DeviceSyncCounter) -> str:
    return "\n".join(f"{n} x {kind} at {site}" for (kind, site), n in counter.sites().most_common())


# --- the counter itself ----------------------------------------------------------------------------


def test_counter_follows_device_tensors() -> None:
    counter = DeviceSyncCounter()
    host = torch.arange(6.0)
    with counter:
        float(host.sum())  # host data: not counted
        dev = host.to(TRAIN, non_blocking=True)
        y = (dev * 2).sum()
        assert counter.total == 0 and y.device == TRAIN and host.device.type == "cpu" and not _marked(host)
        float(y)
        bool(dev.any())
        dev[dev > 2]
        dev[[0, 1]]
        dev.nonzero()
        dev.to(TRAIN)  # already there: nothing to copy
        h = dev.cpu()
        float(h.sum())  # on the host now: not counted
        host.to(TRAIN)  # a blocking host-to-device copy
        torch.tensor([1, 2], device=TRAIN)
    kinds = [k for k, _ in counter.events]
    assert kinds == ["read __float__", "read __bool__", "index (boolean mask or host index)",
                     "index (boolean mask or host index)", "data-dependent nonzero", "device-to-host copy (cpu)",
                     "blocking host-to-device copy (to)", "blocking host-to-device copy (tensor)"], kinds


# --- the training step -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["crl", "circuit_breakers", "repbend"])
def test_one_metrics_read_per_optimizer_step(tmp_path, pools_dir, on_train_device, method) -> None:
    counter, trainer = count_syncs(_config(pools_dir, f'loss.method="{method}"'), tmp_path)
    assert trainer.step == 3
    assert counter.total == 3, _report(counter)
    assert all(kind == "read tolist" and "read_tensors" in site for kind, site in counter.events), _report(counter)


def test_a_new_read_in_the_step_is_caught(tmp_path, pools_dir, on_train_device) -> None:
    """The instrument sees a `float(loss)` added to the step: one more per micro-batch."""
    from crl.training.step import LossComputer

    real = LossComputer.__call__

    def reading(self, batches, progress):
        out = real(self, batches, progress)
        float(out.loss)  # what a careless metric would do
        return out

    def wrap(trainer):
        trainer.loss.__class__ = type("ReadingLossComputer", (LossComputer,), {"__call__": reading})

    counter, _ = count_syncs(_config(pools_dir), tmp_path, wrap=wrap)
    assert counter.total == 3 + 3 * 2, _report(counter)


def _mining(tmp_path: Path, *extra: str) -> list[str]:
    return ["mining.enabled=true", 'mining.backend="native"', f'mining.cache_dir="{tmp_path / "banks"}"', "mining.k=2",
            "mining.queue_size=6", *extra]


def test_mining_adds_one_host_copy_per_micro_batch(tmp_path, pools_dir, on_train_device) -> None:
    counter, _ = count_syncs(_config(pools_dir, *_mining(tmp_path)), tmp_path / "run")
    steps, micro = 3, 2
    assert counter.total == steps * (1 + micro), _report(counter)
    copies = [site for kind, site in counter.events if kind.startswith("device-to-host")]
    assert len(copies) == steps * micro and all("to_host" in site for site in copies), _report(counter)


@pytest.mark.parametrize("persistence", ["universal", "per_sample"])
def test_refinement_syncs_are_bounded(tmp_path, pools_dir, on_train_device, persistence) -> None:
    """Per attacked micro-batch: one host copy of the attacked samples' queries, and one read of the
    clean states' scale when the perturbation is optimised (Adam's learning rate)."""
    calls = {"refine": 0, "attack": 0}

    def wrap(trainer):
        refiner = trainer.refiner
        real = refiner.refine

        def refine(*args, **kwargs):
            out = real(*args, **kwargs)
            calls["refine"] += 1
            calls["attack"] += "attack_loss" in out.values
            return out

        refiner.refine = refine

    extra = _mining(tmp_path, "refinement.enabled=true", "refinement.layers=[1, 2]", "refinement.steps=2",
                    "refinement.refresh_every=2", "refinement.probability=0.75", f'refinement.persistence="{persistence}"')
    counter, _ = count_syncs(_config(pools_dir, *extra), tmp_path / "run", wrap=wrap)
    steps, micro = 3, 2
    assert calls["refine"] > 0 and calls["attack"] > 0, calls
    assert counter.total == steps * (1 + micro) + calls["refine"] + calls["attack"], (calls, _report(counter))


# --- resume and setup ------------------------------------------------------------------------------------


def test_resume_keeps_adam_step_counters_on_the_host(tmp_path, pools_dir, monkeypatch) -> None:
    """`--resume` reads the checkpoint onto the CPU: Adam's `step` counters stay host tensors (on a
    GPU, device counters cost a read per parameter in every step of the non-capturable Adam) and the
    moments land on their parameters' devices."""
    import crl.training.trainer as trainer_module

    config = _config(pools_dir, "run.checkpoint_every=2", "optim.max_steps=4")
    model, tokenizer = build_tiny_llama(seed=0)
    Trainer(config, tmp_path, model=model, tokenizer=tokenizer).train(max_steps=2)
    devices = []
    real = trainer_module.read_checkpoint

    def spy(path, device="cpu"):
        devices.append(str(device))
        return real(path, device=device)

    monkeypatch.setattr(trainer_module, "read_checkpoint", spy)
    model, tokenizer = build_tiny_llama(seed=0)
    trainer = Trainer(config, tmp_path, resume=True, model=model, tokenizer=tokenizer)
    trainer._restore()
    assert devices == ["cpu"]
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert params and all(p in trainer.optimizer.state for p in params)
    for p in params:
        state = trainer.optimizer.state[p]
        assert state["step"].device.type == "cpu" and float(state["step"]) == 2.0
        assert state["exp_avg"].device == p.device and state["exp_avg_sq"].device == p.device
    trainer.train()
    assert trainer.step == 4
    assert all(trainer.optimizer.state[p]["step"].device.type == "cpu" for p in params)


def test_demo_pools_are_generated_on_the_training_device(tmp_path, pools_dir, on_train_device, monkeypatch) -> None:
    import crl.data

    model, tokenizer = build_tiny_llama(seed=0)
    moves = []
    real_to = model.to

    def to(*args, **kwargs):
        moves.append(args[0] if args else kwargs.get("device"))
        return real_to(*args, **kwargs)

    monkeypatch.setattr(model, "to", to)
    seen = []

    def build_pools(model, *args, **kwargs):
        seen.append(list(moves))
        return crl.data.load_pools(pools_dir)

    monkeypatch.setattr(crl.data, "build_pools", build_pools)
    config = load_train_config(REPO / "configs" / "tiny.toml", ['data.pools="demo"', "optim.max_steps=1"])
    Trainer(config, tmp_path, model=model, tokenizer=tokenizer)
    assert seen and TRAIN in seen[0], (moves, seen)
