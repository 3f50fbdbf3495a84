"""One micro-batch of training: the frozen and trained passes and the method's loss.

Passes per micro-batch (whatever the method): the benign and harmful sequences go through the model
together, once with the adapter disabled (the frozen reference, no grad) and once with it (the
trained model), both truncated after the last loss layer; the retain sequences, which feed the KL
term, go through the whole model twice the same way, and only the selected tokens reach the LM head.

No host synchronisation: the token selections arrive as flat row indices built on the host
(`StepRows`, from the CPU batch in `Trainer._next_batches`), so gathering the selected states is an
`index_select` whose size the host knows; row counts (global ones under several processes) are host
ints; metrics are returned as device tensors (`StepOutput.values`) that the trainer reads once per
optimizer step. With mining, the pooled queries (and the batch's vectors for the queue) come to the
host in one copy per micro-batch, for the search that runs there; refinement adds the attacked
samples' queries (one copy) and, when it attacks, one read of the clean states' scale (Adam's
learning rate is a host number). See docs/distributed.md.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from crl.data import Batch
from crl.losses.objectives import RowIndex, retain_kl
from crl.methods import StepStates
from crl.models import capture_hidden_states, num_hidden_layers, unwrap_model
from crl.training.config import LossConfig, MiningConfig
from crl.training.metrics import Value, read_values

if TYPE_CHECKING:
    from crl.mining.adversary import ModuleAdversary
    from crl.mining.stage import MiningStage
    from crl.training.distributed import DistributedContext


@dataclass
class StepRows:
    """The row sets of a micro-batch as flat token indices (`RowIndex`), built on the host."""

    benign: RowIndex
    """The selected tokens of the benign rows of the contrast batch."""
    harmful: RowIndex
    """The selected tokens of its harmful rows."""
    benign_tokens: RowIndex | None = None
    """Every attended token of the benign rows (circuit breakers' retain set)."""
    retain_tokens: RowIndex | None = None
    """Every attended token of the retain batch (the KL term's)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "StepRows":
        move = lambda r: r.to(device, non_blocking) if r is not None else None  # noqa: E731
        return StepRows(move(self.benign), move(self.harmful), move(self.benign_tokens), move(self.retain_tokens))


def step_rows(
    contrast: Batch, num_benign: int, selection: torch.Tensor, retain: Batch | None = None,
    totals: dict[str, int] | None = None,
) -> StepRows:
    """The row sets of a micro-batch from its host (CPU) tensors: no synchronisation. `totals`: the
    global batch's row count of each set (keys benign, harmful, benign_tokens, retain_tokens) under
    several processes; by default the local counts."""
    totals = totals or {}
    is_benign = torch.arange(selection.shape[0]).unsqueeze(1) < num_benign
    attended = contrast.attention_mask.detach().cpu().bool()
    selection = selection.detach().cpu()
    sets = {
        "benign": selection & is_benign,
        "harmful": selection & ~is_benign,
        "benign_tokens": attended & is_benign,
        "retain_tokens": retain.attention_mask.detach().cpu().bool() if retain is not None else None,
    }
    rows = {k: RowIndex.from_mask(m, total=totals.get(k)) if m is not None else None for k, m in sets.items()}
    return StepRows(**rows)


def row_totals(contrast: Batch, num_benign: int, selection: torch.Tensor, retain: Batch | None) -> dict[str, int]:
    """The row count of each set of `step_rows` for a (global) host batch."""
    rows = step_rows(contrast, num_benign, selection, retain)
    return {"benign": rows.benign.count, "harmful": rows.harmful.count, "benign_tokens": rows.benign_tokens.count,
            "retain_tokens": rows.retain_tokens.count if rows.retain_tokens is not None else 0}


@dataclass
class StepBatches:
    """The micro-batch of each pool, already on the model's device."""

    contrast: Batch
    """Benign sequences first, then harmful ones, padded together."""
    num_benign: int
    retain: Batch | None
    selection: torch.Tensor
    """[B, T] bool: the tokens whose states enter the representation losses."""
    benign_ids: torch.Tensor | None = None
    """[num_benign] int64 (host): benign-pool index of each benign sample (for mining's history)."""
    harmful_ids: torch.Tensor | None = None
    """[num_harmful] int64 (host): harmful-pool index of each harmful sample (the bank's sample ids)."""
    step: int = 0
    """Optimizer steps done before this micro-batch (refinement's schedule)."""
    micro: int = 0
    """Index of the micro-batch within its optimizer step."""
    rows: StepRows | None = None
    """The row sets as flat indices on the device, built on the host (`Trainer._next_batches`). None:
    built from `selection` at the start of the step (one device-to-host copy when it is on a GPU; one
    process only)."""
    global_harmful_ids: torch.Tensor | None = None
    """Several processes: the harmful ids of the global batch (host; every rank's, in rank order)."""
    harmful_shards: list[int] | None = None
    """Several processes: the number of harmful samples of each rank, in rank order."""


@dataclass
class StepOutput:
    loss: torch.Tensor
    values: dict[str, Value] = field(default_factory=dict)
    """The metrics as computed, not yet read: 0-dim detached device tensors, host floats (seconds_*,
    coef_*, mining statistics) and None for a key not logged by this process (crl.training.metrics)."""

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics as host floats (one device read: a synchronisation on a GPU; the trainer reads
        `values` once per optimizer step instead). Under several processes: this rank's values."""
        return read_values([self.values])[0][0]


def token_selection(batch: Batch, mode: str, first_n: int) -> torch.Tensor:
    """[B, T] bool mask of the tokens the representation losses use (see LossConfig.tokens). Runs
    where the batch is (the trainer calls it on the CPU batch: `last_request` uses a nonzero)."""
    if mode == "response":
        return batch.response_mask.clone()
    if mode == "request":
        return batch.request_mask.clone()
    if mode == "last_request":
        positions = torch.arange(batch.request_mask.shape[1], device=batch.request_mask.device)
        last = torch.where(batch.request_mask, positions, torch.full_like(positions, -1)).amax(dim=1)
        mask = torch.zeros_like(batch.request_mask)
        has = last >= 0
        mask[has.nonzero(as_tuple=True)[0], last[has]] = True
        return mask
    if mode == "first_response":
        rank = torch.cumsum(batch.response_mask.long(), dim=1)
        return batch.response_mask & (rank <= first_n)
    if mode == "assistant":
        # Everything after the request up to the response's end: the template's assistant header,
        # then the response. Under "response" alone the state that emits the first response token
        # (the header's last) is never trained, and a defended model can still open compliantly.
        positions = torch.arange(batch.request_mask.shape[1], device=batch.request_mask.device)
        none = torch.full_like(positions, -1)
        last_request = torch.where(batch.request_mask, positions, none).amax(dim=1, keepdim=True)
        last_response = torch.where(batch.response_mask, positions, none).amax(dim=1, keepdim=True)
        return (positions > last_request) & (positions <= last_response)
    raise ValueError(f"loss.tokens: unknown token selection {mode!r}")


def contrast_selection(contrast: Batch, num_benign: int, config: LossConfig) -> torch.Tensor:
    """The token selection of a contrast batch: its first `num_benign` rows (benign pool) under
    `loss.tokens`, the others (harmful pool) under `loss.harmful_tokens`."""
    benign = token_selection(contrast, config.tokens, config.first_response_tokens)
    if config.resolved_harmful_tokens == config.tokens:
        return benign
    harmful = token_selection(contrast, config.resolved_harmful_tokens, config.first_response_tokens)
    rows = torch.arange(contrast.input_ids.shape[0], device=benign.device).unsqueeze(1) < num_benign
    return torch.where(rows, benign, harmful)


def _final_logits(model: torch.nn.Module, batch: Batch, tokens: RowIndex | torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the given tokens only (a `RowIndex`, or a [B, T] bool mask): the last hidden
    state (layer L, which crl's capture takes after the final norm, as transformers' hidden_states[-1])
    through the LM head, without materialising [B, T, V]."""
    if not isinstance(tokens, RowIndex):
        tokens = RowIndex.from_mask(tokens)
    last = num_hidden_layers(model)
    hidden = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [last], padded=batch.padded)[last]
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, tokens.flat)
    return unwrap_model(model).get_output_embeddings()(rows)


class LossComputer:
    """Runs the passes of one micro-batch and hands the states to the configured method
    (crl.methods); adds the retain KL when the method has one."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: LossConfig,
        *,
        autocast: bool = False,
        mining: MiningStage | None = None,
        mining_config: MiningConfig | None = None,
        adversary: ModuleAdversary | None = None,
        dist: DistributedContext | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        from crl.methods import MethodContext, method_class

        self.model = model
        self.dist = dist
        """Multi-process context (None: one process, the plain code path); see crl.training.distributed."""
        self.config = config
        self.layers = config.captured_layers
        self.autocast = autocast
        self._device = torch.device(device) if device is not None else None
        self.sync_timings = False
        """Synchronise with the device before each clock read, so that `seconds_*` measure the device's
        work on a GPU (benchmarks only: without it they measure the host's, which only queues it)."""
        context = MethodContext(frame_center=config.center_states, frame_scale=config.normalize_layer_scale, dist=dist)
        cls = method_class(config.method)
        extra: dict = {}
        if mining is not None or adversary is not None:
            if config.method != "crl":
                raise ValueError("mining and the adversary: only loss.method = 'crl' uses them")
            extra = {"mining": mining, "mining_config": mining_config, "adversary": adversary}
        if mining is not None:
            mining.clock = self.clock
        self.method = cls(config, config.method_config, context, **extra)

    @property
    def device(self) -> torch.device:
        """The training device (the model's, unless given)."""
        if self._device is None:
            self._device = next(self.model.parameters()).device
        return self._device

    def clock(self) -> float:
        if self.sync_timings and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _amp(self):
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _frozen(self):
        return self.model.disable_adapter()

    def _step_rows(self, batches: StepBatches) -> StepRows:
        """The row sets of a hand-built micro-batch (no `rows`): from its selection, via the host."""
        if self.dist is not None:
            raise ValueError("StepBatches.rows is required under several processes (the global row counts; "
                             "Trainer._next_batches builds it)")
        rows = step_rows(batches.contrast, batches.num_benign, batches.selection, batches.retain)
        return rows.to(batches.contrast.input_ids.device)

    def _capture(self, contrast: Batch, frozen: bool) -> dict[int, torch.Tensor]:
        with (torch.no_grad() if frozen else nullcontext()), (self._frozen() if frozen else nullcontext()), self._amp():
            return capture_hidden_states(self.model, contrast.input_ids, contrast.attention_mask, self.layers,
                                         padded=contrast.padded)

    def __call__(self, batches: StepBatches, progress: float) -> StepOutput:
        contrast = batches.contrast
        rows = batches.rows if batches.rows is not None else self._step_rows(batches)
        timings: dict[str, float] = {}
        metrics: dict[str, Value] = {}
        self.method.prepare(self.model, metrics)
        t0 = self.clock()
        frozen_hidden = self._capture(contrast, frozen=True)
        t1 = self.clock()
        trained_hidden = self._capture(contrast, frozen=False)
        t2 = self.clock()
        timings["seconds_frozen_pass"] = t1 - t0
        timings["seconds_trained_pass"] = t2 - t1
        states = StepStates(frozen_hidden, trained_hidden, rows, self.layers, batches.num_benign,
                            int(contrast.input_ids.shape[0]) - batches.num_benign, batches, self.model,
                            lambda batch: self._capture(batch, frozen=False))
        loss = self.method.loss(states, progress, metrics)
        t3 = self.clock()
        timings["seconds_loss"] = t3 - t2
        weight = self.method.retain_kl_weight(progress)
        if weight is not None and batches.retain is not None:
            loss = loss + weight * self._retain_kl(batches.retain, rows, metrics)
            metrics["coef_kl"] = weight
            timings["seconds_retain_passes"] = self.clock() - t3
        metrics.update(timings)
        metrics["loss"] = loss.detach()
        if self.dist is not None and not self.method.global_shares:
            # crl: each rank's loss is its share of the global loss (gradients are summed over ranks);
            # the baselines: local means, averaged over ranks (their metrics too, in the trainer).
            loss = loss / self.dist.world_size
        return StepOutput(loss, metrics)

    def _retain_kl(self, retain: Batch, rows: StepRows, metrics: dict[str, Value]) -> torch.Tensor:
        """KL of the trained model's next-token distributions to the frozen model's on the retain batch
        (this rank's share of the global mean for a method with global shares): the mean over the
        tokens (`loss.kl_reduction = "token_mean"`) or the sum over the tokens divided by the number of
        sequences (`"batchmean"`, the reference code's; under several processes the global batch's
        count, `Batch.global_size`, which the trainer sets)."""
        kl_rows = rows.retain_tokens
        assert kl_rows is not None
        with torch.no_grad(), self._frozen(), self._amp():
            frozen_logits = _final_logits(self.model, retain, kl_rows)
        with self._amp():
            trained_logits = _final_logits(self.model, retain, kl_rows)
        reduction = self.config.kl_reduction
        sequences = int(retain.input_ids.shape[0])
        kl = retain_kl(frozen_logits, trained_logits, self.config.kl_temperature, reduction=reduction,
                       num_sequences=sequences)
        if self.dist is not None and self.method.global_shares:
            if reduction == "batchmean":
                if retain.global_size is None:
                    raise ValueError("loss.kl_reduction = 'batchmean' under several processes needs the global "
                                     "batch's sequence count (Batch.global_size; Trainer._next_batches sets it)")
                kl = self.dist.shard_mean(kl, sequences, retain.global_size)
            else:
                kl = self.dist.shard_mean(kl, kl_rows.count, kl_rows.total)
        metrics["loss_kl"] = kl.detach()
        return kl


__all__ = [
    "LossComputer", "StepBatches", "StepOutput", "StepRows", "contrast_selection", "row_totals", "step_rows",
    "token_selection",
]
