"""The training configuration: every hyperparameter of a run, validated when loaded.

Layers follow the convention used throughout crl: layer l is `hidden_states[l]` of transformers'
`output_hidden_states=True` (0 = embeddings, l >= 1 = the output of decoder layer l - 1), as in the
Circuit Breakers and CRL reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from crl.config import ConfigError, Schedule, apply_overrides, from_dict, load_config_file, require, to_dict
from crl.mining.config import MiningConfig, RefinementConfig

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
        if self.layers is not None:
            require(all(l >= 0 for l in self.layers), "layers", "decoder layers >= 0", self.layers)


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
        require(self.generation_max_new_tokens >= 1, "generation_max_new_tokens", "an integer >= 1",
                self.generation_max_new_tokens)


@dataclass
class SharedLossConfig:
    """`[loss]`: what every method shares (which method, layers, tokens, the layer frame, the KL's
    temperature and reduction); each method's own keys are in its section, `[loss.<method>]` (crl.methods)."""

    MOVED_KEYS: ClassVar[dict[str, str | tuple[str, ...]]] = {
        "alpha": ("crl.benign_weight", "circuit_breakers.coefficient", "repbend.benign_distance_weight"),
        "beta": ("crl.harmful_weight", "repbend.harmful_distance_weight"),
        "gamma": ("crl.retain_kl_weight", "repbend.harmful_dissimilarity_weight"),
        "epsilon": "repbend.retain_kl_weight",
        **{key: f"crl.{key}" for key in (
            "benign_positive_distance", "benign_negative_distance", "harmful_positive_distance",
            "harmful_negative_distance", "mix_weight", "benign_margin", "harmful_margin")},
    }
    method: str = "crl"
    """One of crl.methods.METHODS: crl, circuit_breakers, repbend."""
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
    center_states: bool = True
    """crl's layer frame: subtract each layer's mean frozen state (over the micro-batch's selected
    tokens) before the distances; removes the component every token shares, which otherwise
    dominates cosines."""
    normalize_layer_scale: bool = True
    """crl's layer frame: divide each layer's states by the mean norm of the frozen model's states
    there, so that l2 distances (and their margins) are relative to the layer's scale, which grows
    with depth."""
    baseline_frame: bool = False
    """Give Circuit Breakers and RepBend crl's layer frame too; off = the baselines as published, on
    raw states."""
    kl_temperature: float = 2.0
    """Temperature of the retain KL (methods that have one)."""
    kl_reduction: Literal["token_mean", "batchmean"] = "token_mean"
    """How the retain KL's per-token values become one number: "token_mean" averages them over the
    retain batch's tokens; "batchmean" sums them and divides by the number of retain sequences, as the
    reference code's `F.kl_div(..., reduction="batchmean")` does (its scale then grows with the
    sequences' length: about the mean tokens per sequence times "token_mean")."""

    def validate(self) -> None:
        require(len(self.target_layers) > 0, "target_layers", "a non-empty list of layers", self.target_layers)
        require(all(l >= 1 for l in self.target_layers), "target_layers", "layers >= 1", self.target_layers)
        if self.benign_layers is not None:
            require(all(l >= 1 for l in self.benign_layers), "benign_layers", "layers >= 1", self.benign_layers)
        require(self.kl_temperature > 0, "kl_temperature", "a number > 0", self.kl_temperature)
        require(self.first_response_tokens >= 1, "first_response_tokens", "an integer >= 1", self.first_response_tokens)
        self._validate_method_sections()

    def _validate_method_sections(self) -> None:
        """Every number of a method's section is a weight, a margin or a coefficient: >= 0 (a negative
        one turns a term into its opposite; nan and inf are refused when the file is read)."""
        import dataclasses

        from crl.methods import METHODS

        for name in METHODS:
            section = getattr(self, name, None)
            if section is None or not dataclasses.is_dataclass(section):
                continue
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                key = f"{name}.{f.name}"
                if isinstance(value, Schedule):
                    require(value.start >= 0 and (value.end is None or value.end >= 0), key,
                            "a number >= 0 (or {start, end} >= 0)", value.start if value.end is None
                            else {"start": value.start, "end": value.end})
                elif isinstance(value, float):
                    require(value >= 0, key, "a number >= 0", value)

    @property
    def method_config(self) -> Any:
        """The chosen method's own section."""
        return getattr(self, self.method)

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


def _loss_config_class() -> type:
    """`[loss]`: the shared keys and one section per registered method (crl.methods.METHODS)."""
    from crl.methods import METHODS

    names = Literal.__getitem__(tuple(METHODS))  # type: ignore[attr-defined]  # "loss.method: expected one of ..."
    sections = [(name, method.Config, field(default_factory=method.Config)) for name, method in METHODS.items()]
    cls = make_dataclass("LossConfig", [("method", names, field(default="crl")), *sections], bases=(SharedLossConfig,))
    cls.__module__ = __name__
    cls.__doc__ = SharedLossConfig.__doc__
    return cls


LossConfig = _loss_config_class()


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
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is nan or inf: "stop" ends the run with an error naming the
    step and the metric (no update, no checkpoint: the last checkpoint stays the last good one);
    "skip" drops that step's update, logs it (`"nonfinite"` in metrics.jsonl) and continues."""

    def validate(self) -> None:
        require(0 < self.lr <= 1, "lr", "a number in (0, 1]", self.lr)
        require(0 <= self.weight_decay <= 1, "weight_decay", "a number in [0, 1]", self.weight_decay)
        require(self.max_grad_norm > 0, "max_grad_norm", "a number > 0 (the gradient norm clipped to)", self.max_grad_norm)
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
            require(self.loss.method == "crl", "refinement.enabled", "false unless loss.method = 'crl'", True)
        if self.refinement.enabled and self.refinement.kind != "module":
            require(self.mining.enabled, "refinement.enabled",
                    "false unless mining.enabled (kind residual/embedding attacks the owners of mined negatives)", True)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_data(cls, data: dict[str, Any], *, source: str = "<config>") -> "TrainConfig":
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
    "RefinementConfig", "RunConfig", "Schedule", "SharedLossConfig", "TrainConfig", "load_train_config",
]
