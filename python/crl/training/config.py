"""The training configuration: every hyperparameter of a run, validated when loaded.

Layers follow the convention used throughout crl: layer l is `hidden_states[l]` of transformers'
`output_hidden_states=True` (0 = embeddings, l >= 1 = the output of decoder layer l - 1), as in the
Circuit Breakers and CRL reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from crl.config import ConfigError, apply_overrides, from_dict, load_config_file, require, to_dict
from crl.losses.distances import DISTANCES

Method = Literal["crl", "circuit_breakers", "repbend"]
TokenSelection = Literal["response", "request", "last_request", "first_response", "assistant"]


@dataclass
class ModelConfig:
    name: str = "smollm2"
    """`smollm2`, `tiny`, `tiny:SEED`, a local Hugging Face folder or a .gguf file."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype. On a GPU bf16 autocast is used for the forward passes in any case."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    layers: list[int] | None = None
    """Decoder layers (0-based) that get adapters; None = every layer that feeds the last loss layer."""

    def validate(self) -> None:
        require(self.r >= 1, "r", "an integer >= 1", self.r)
        require(self.alpha >= 1, "alpha", "an integer >= 1", self.alpha)
        require(0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)", self.dropout)
        require(len(self.target_modules) > 0, "target_modules", "a non-empty list of module names", self.target_modules)


@dataclass
class DataConfig:
    pools: str = "demo"
    """A folder with harmful.jsonl, benign.jsonl and retain.jsonl (from `crl data build`), or `demo`
    to build the built-in demo pools with the base model (cached in the run folder)."""
    max_length: int = 256
    """Tokens per sequence at most (the response is cut first); batches pad to their longest."""
    batch_size: int = 4
    """Sequences per micro-batch from each pool (benign, harmful, retain)."""
    generation_max_new_tokens: int = 64
    """Length of the model's own completions when the demo pools are built."""

    def validate(self) -> None:
        require(self.max_length >= 8, "max_length", "an integer >= 8", self.max_length)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)


@dataclass
class Schedule:
    """A coefficient: constant (`end` unset) or linear from `start` to `end` over the run."""

    start: float
    end: float | None = None

    def at(self, progress: float) -> float:
        return self.start if self.end is None else self.start + (self.end - self.start) * progress


@dataclass
class LossConfig:
    method: Method = "crl"
    target_layers: list[int] = field(default_factory=lambda: [8, 12, 16])
    """Layers of the harmful term (and of Circuit Breakers' rerouting)."""
    benign_layers: list[int] | None = None
    """Layers of the benign term; None = the target layers."""
    tokens: TokenSelection = "response"
    """Tokens whose states enter the representation losses: "response"; "assistant" (the chat
    template's assistant header and the response: the header's last state is the one that emits the
    first response token); "request"; "last_request"; "first_response" (the first N response tokens)."""
    harmful_tokens: TokenSelection | None = None
    """Token selection of the harmful pool (and of its bank and refinement); None = `tokens`."""
    first_response_tokens: int = 16
    """With tokens = first_response: how many response tokens."""
    # CRL triplets
    benign_positive_distance: str = "l2"
    benign_negative_distance: str = "cosine"
    harmful_positive_distance: str = "cosine"
    harmful_negative_distance: str = "cosine"
    mix_weight: float = 1.0
    benign_margin: float = 0.5
    harmful_margin: float = 0.5
    center_states: bool = True
    """Subtract each layer's mean frozen state (over the micro-batch's selected tokens) before the
    distances: removes the component every token shares, which otherwise dominates cosines."""
    normalize_layer_scale: bool = True
    """Divide each layer's states by the mean norm of the frozen model's states there, so that l2
    distances (and their margins) are relative to the layer's scale, which grows with depth."""
    baseline_frame: bool = False
    """Give Circuit Breakers and RepBend crl's layer frame too (`center_states`,
    `normalize_layer_scale`); off = the baselines as published, on raw states."""
    alpha: Schedule = field(default_factory=lambda: Schedule(0.5))
    """Benign term (CRL), Circuit Breakers' coefficient, RepBend's benign-distance term."""
    beta: Schedule = field(default_factory=lambda: Schedule(0.6))
    """Harmful term (CRL), RepBend's harmful-distance term."""
    gamma: Schedule = field(default_factory=lambda: Schedule(0.7))
    """Retain KL (CRL), RepBend's harmful-cosine term."""
    epsilon: Schedule = field(default_factory=lambda: Schedule(1.0))
    """RepBend's retain KL."""
    kl_temperature: float = 2.0

    def validate(self) -> None:
        require(len(self.target_layers) > 0, "target_layers", "a non-empty list of layers", self.target_layers)
        require(all(l >= 1 for l in self.target_layers), "target_layers", "layers >= 1", self.target_layers)
        if self.benign_layers is not None:
            require(all(l >= 1 for l in self.benign_layers), "benign_layers", "layers >= 1", self.benign_layers)
        for name in (
            "benign_positive_distance", "benign_negative_distance",
            "harmful_positive_distance", "harmful_negative_distance",
        ):
            value = getattr(self, name)
            require(value in DISTANCES, name, "one of " + ", ".join(DISTANCES), value)
        require(self.kl_temperature > 0, "kl_temperature", "a number > 0", self.kl_temperature)
        require(self.first_response_tokens >= 1, "first_response_tokens", "an integer >= 1", self.first_response_tokens)

    @property
    def resolved_harmful_tokens(self) -> str:
        return self.harmful_tokens if self.harmful_tokens is not None else self.tokens

    @property
    def resolved_benign_layers(self) -> list[int]:
        return list(self.benign_layers) if self.benign_layers is not None else list(self.target_layers)

    @property
    def captured_layers(self) -> list[int]:
        """Every layer a hidden-state pass must capture (the union of both terms' layers)."""
        return sorted(set(self.target_layers) | set(self.resolved_benign_layers))


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = 1.0
    max_steps: int = 100
    """Optimizer steps (every schedule is counted in optimizer steps, not micro-batches)."""
    grad_accumulation: int = 1

    def validate(self) -> None:
        require(self.lr > 0, "lr", "a number > 0", self.lr)
        require(self.max_steps >= 1, "max_steps", "an integer >= 1", self.max_steps)
        require(self.grad_accumulation >= 1, "grad_accumulation", "an integer >= 1", self.grad_accumulation)
        require(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0", self.warmup_steps)


@dataclass
class RunConfig:
    seed: int = 0
    checkpoint_every: int = 25
    """Optimizer steps between checkpoints (a killed run loses at most this many steps)."""
    keep_checkpoints: int = 2
    progress: bool = True

    def validate(self) -> None:
        require(self.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1", self.checkpoint_every)
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1", self.keep_checkpoints)


MiningBackend = Literal["auto", "native", "native_fp32", "faiss_flat", "faiss_ivf", "faiss_hnsw"]


@dataclass
class MiningConfig:
    """Hard-negative mining from a representation bank (docs/hard_negatives.md). Off by default."""

    enabled: bool = False
    k: int = 4
    """Mined negatives per anchor sample and layer."""
    backend: MiningBackend = "auto"
    """Index over the frozen bank: `native` (exact Rust miner), `native_fp32`, `faiss_flat`,
    `faiss_ivf`, `faiss_hnsw`, or `auto` (native when the bank fits in memory, IVF beyond)."""
    metric: Literal["cosine", "ip"] = "cosine"
    """Similarity used to rank bank vectors."""
    combine: Literal["add", "replace"] = "add"
    """`add`: the mined triplet terms, times `weight`, are added to the batch-centroid terms;
    `replace`: the mined negatives replace the centroid (benign) and h(x) (harmful) negatives."""
    weight: float = 1.0
    """Weight of the mined terms with combine = add."""
    center: bool = True
    """Rank in the loss's frame: bank, queue and queries minus the frozen bank's per-layer mean
    (the index then holds a centred copy of the bank). False ranks the raw vectors in place."""
    bank_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    bank_size: int = 100_000
    """Harmful samples in the frozen bank at most (a seeded subset beyond)."""
    queue_size: int = 4096
    """Trained-model vectors per layer kept in the queue."""
    cache_dir: str | None = None
    """Where frozen banks are cached (keyed by model, data, layers, pooling); None = $CRL_CACHE/banks."""
    bank_batch_size: int = 8
    nlist: int = 0
    """IVF lists (0 = about 4 sqrt(N))."""
    nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    auto_native_max_gib: float = 8.0
    """With backend = auto: the largest bank (GiB, as stored) searched by the native miner."""
    threads: int | None = None
    """Search threads (None = all cores)."""

    def validate(self) -> None:
        require(self.k >= 1, "k", "an integer >= 1", self.k)
        require(self.weight >= 0, "weight", "a number >= 0", self.weight)
        require(self.bank_size >= 2, "bank_size", "an integer >= 2", self.bank_size)
        require(self.queue_size >= 1, "queue_size", "an integer >= 1", self.queue_size)
        require(self.bank_batch_size >= 1, "bank_batch_size", "an integer >= 1", self.bank_batch_size)
        require(self.nlist >= 0, "nlist", "an integer >= 0", self.nlist)
        require(self.nprobe >= 1, "nprobe", "an integer >= 1", self.nprobe)
        require(self.hnsw_m >= 2, "hnsw_m", "an integer >= 2", self.hnsw_m)
        require(self.hnsw_ef_search >= 1, "hnsw_ef_search", "an integer >= 1", self.hnsw_ef_search)
        require(self.auto_native_max_gib > 0, "auto_native_max_gib", "a number > 0", self.auto_native_max_gib)
        require(self.threads is None or self.threads >= 1, "threads", "an integer >= 1 or unset", self.threads)


@dataclass
class RefinementConfig:
    """Adversarial refinement of the samples owning the hardest negatives (needs mining). Off by default."""

    enabled: bool = False
    target: Literal["residual", "embedding"] = "residual"
    """`residual`: perturb hidden state l (drawn from `layers`); `embedding`: the input embeddings."""
    layers: list[int] = field(default_factory=lambda: [2, 4])
    """[low, high]: the attacked hidden state is drawn uniformly from low..high (inclusive) once
    per refresh period; low = high fixes it. Hidden state l >= 1 is the output of decoder layer l-1."""
    eps: float = 0.1
    """Bound, relative to the clean hidden state: L2 norm <= eps ||h|| (norm = l2) or each
    coordinate <= eps rms(h) (norm = linf)."""
    norm: Literal["l2", "linf"] = "l2"
    steps: int = 2
    """Adam steps on the perturbation per refresh."""
    refresh_every: int = 1
    """Optimizer steps between refreshes; in between, the persisted perturbation is applied as is."""
    lr: float = 0.2
    """Adam step size as a fraction of the bound: Adam's lr is set to lr * eps * rms(h) (rms over the
    attacked tokens' clean states), so one step moves the perturbation by about lr * eps * ||h||."""
    probability: float = 1.0
    """Chance that a micro-batch gets attacked anchors."""
    samples: int = 2
    """Samples attacked per micro-batch (the owners of the hardest negatives)."""
    persistence: Literal["universal", "per_sample"] = "universal"
    """`universal`: one [1, 1, d] perturbation per layer, kept across micro-batches and refined
    `steps` Adam steps every `refresh_every` optimizer steps (cheap, a universal adversarial
    perturbation). `per_sample`: a fresh per-token perturbation for each attacked sample, from zero,
    `steps` Adam steps at every attacked micro-batch (the attack the evaluation runs; costs `steps`
    forward and backward passes of `samples` sequences per micro-batch)."""

    def validate(self) -> None:
        require(len(self.layers) == 2 and 1 <= self.layers[0] <= self.layers[1], "layers",
                "[low, high] with 1 <= low <= high", self.layers)
        require(self.eps > 0, "eps", "a number > 0", self.eps)
        require(self.steps >= 0, "steps", "an integer >= 0", self.steps)
        require(self.refresh_every >= 1, "refresh_every", "an integer >= 1", self.refresh_every)
        require(self.lr > 0, "lr", "a number > 0", self.lr)
        require(0.0 <= self.probability <= 1.0, "probability", "a number in [0, 1]", self.probability)
        require(self.samples >= 1, "samples", "an integer >= 1", self.samples)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)

    def validate(self) -> None:
        if self.mining.enabled:
            require(self.loss.method == "crl", "mining.enabled", "false unless loss.method = 'crl'", True)
        if self.refinement.enabled:
            require(self.mining.enabled, "refinement.enabled", "false unless mining.enabled (it attacks the owners of mined negatives)", True)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_data(cls, data: dict[str, Any], *, source: str = "<config>") -> "TrainConfig":
        return _with_schedules(cls, data, source)


def _with_schedules(cls: type[TrainConfig], data: dict[str, Any], source: str) -> TrainConfig:
    # Coefficients may be written as a plain number (constant) or as {start, end}.
    loss = data.get("loss")
    if isinstance(loss, dict):
        loss = dict(loss)
        for name in ("alpha", "beta", "gamma", "epsilon"):
            if isinstance(loss.get(name), (int, float)) and not isinstance(loss.get(name), bool):
                loss[name] = {"start": float(loss[name])}
        data = {**data, "loss": loss}
    return from_dict(cls, data, source=source)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a TOML/YAML training config (or the defaults when path is None) with --set overrides."""
    data = load_config_file(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        apply_overrides(data, overrides)
    return TrainConfig.from_data(data, source=source)


__all__ = [
    "ConfigError", "DataConfig", "LoraConfig", "LossConfig", "MiningConfig", "ModelConfig", "OptimConfig",
    "RefinementConfig", "RunConfig", "Schedule", "TrainConfig", "load_train_config",
]
