"""The `[mining]` and `[refinement]` sections of the training config (docs/hard_negatives.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from crl.config import require

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
    """Adversarial hard negatives (docs/hard_negatives.md). Off by default.

    `kind = "module"`: the paper's adversary (the reference code's attack.py and trainer.py): a
    linear module after an early decoder layer, trained to make the model produce the harmful
    responses; while it succeeds, the harmful batch sometimes runs through the attacked model. Its
    keys are the `module_*` ones, at the reference's values. `kind = "residual"` / `"embedding"`:
    crl's bounded refinement of the samples owning the hardest mined negatives (needs mining)."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {"target": "kind"}
    enabled: bool = False
    kind: Literal["residual", "embedding", "module"] = "residual"
    """`residual`: perturb hidden state l (drawn from `layers`); `embedding`: the input embeddings;
    `module`: the paper's adversary module."""
    layers: list[int] = field(default_factory=lambda: [2, 4])
    """[low, high]: the attacked hidden state is drawn uniformly from low..high (inclusive) once
    per refresh period; low = high fixes it. Hidden state l >= 1 is the output of decoder layer l-1."""
    eps: float = 0.1
    """Bound, relative to the clean hidden state: L2 norm <= eps ||h|| (norm = l2) or each
    coordinate <= eps rms(h) (norm = linf)."""
    norm: Literal["l2", "linf"] = "l2"
    steps: int = 2
    """Adam steps on the perturbation per refresh (at least this many when `max_steps` is set)."""
    max_steps: int | None = None
    """Adaptive attack: after `steps`, keep stepping while the attack's response cross-entropy is
    above `stop_loss`, up to this many steps in all. As the defence hardens a fixed step count stops
    reaching harmful completions and its states stop being hard negatives (docs/hard_negatives.md);
    this keeps the attack's strength matched to the defence. Costs one host read of the loss per
    step past `steps`. None: exactly `steps`."""
    stop_loss: float = 1.5
    """With `max_steps`: the response cross-entropy below which the attack counts as succeeding."""
    refresh_every: int = 1
    """Optimizer steps between refreshes; in between, the persisted perturbation is applied as is."""
    lr: float = 0.2
    """Adam step size as a fraction of the bound: Adam's lr is set to lr * eps * rms(h) (rms over the
    attacked tokens' clean states), so one step moves the perturbation by about lr * eps * ||h||."""
    probability: float = 1.0
    """Chance that a micro-batch gets attacked anchors."""
    start_step: int = 0
    """Optimizer steps of plain CRL (mining on, no attack) before the residual or embedding attack
    starts, so the attacked states meet a defence that has already formed (0: from the first step).
    The module keeps the reference's own schedule (`module_refresh_micro_batches`)."""
    samples: int = 2
    """Samples attacked per micro-batch (the owners of the hardest negatives)."""
    module_layers: list[int] | None = None
    """[low, high): the decoder layer after which the module is inserted is drawn uniformly from this
    range at every refresh. None: the reference's range, decoder layers 0-9 of Llama-3-8B's 32, scaled
    to the model's depth (0 to round(10 L / 32) - 1)."""
    module_refresh_micro_batches: int = 40
    """A new module (at a newly drawn layer) every this many micro-batches (the reference: 40)."""
    module_iterations: int = 1100
    """Training iterations (one sample each, drawn without replacement) of a new module (1100)."""
    module_step_iterations: int = 1
    """Iterations the current module trains at every other micro-batch (1)."""
    module_lr: float = 1e-4
    """Adam's learning rate for the module (1e-4; a new Adam each training call, as the reference)."""
    module_stop_loss: float = 1.85
    """Training stops early once the mean of the last `module_stop_window` losses is below this (1.85)."""
    module_stop_window: int = 100
    module_probability: float = 0.25
    """Chance that a micro-batch's harmful states come from the attacked model (0.25)..."""
    module_success_loss: float = 3.0
    """...and only while the mean of the module's last `module_success_window` losses is below this (3)."""
    module_success_window: int = 10
    module_combine: Literal["replace", "join"] = "replace"
    """`replace` (the reference): the attacked harmful states are the harmful anchors and the centroid;
    `join`: they join the clean anchors (the centroid stays the clean batch's)."""
    module_max_relative_norm: float | None = None
    """Optional bound on the module's change of the residual stream, relative to ||h|| per token
    (None: unbounded, as in the paper)."""
    persistence: Literal["universal", "per_sample"] = "universal"
    """`universal`: one [1, 1, d] perturbation per layer, kept across micro-batches and refined
    `steps` Adam steps every `refresh_every` optimizer steps (cheap, a universal adversarial
    perturbation). `per_sample`: a fresh per-token perturbation for each attacked sample, from zero,
    `steps` Adam steps at every attacked micro-batch (the attack the evaluation runs; costs `steps`
    forward and backward passes of `samples` sequences per micro-batch)."""
    benign_invariance: float = 0.0
    """Weight (relative to the benign term's) of a second benign triplet term whose anchors are the
    micro-batch's benign samples with the universal perturbation added to their prompt tokens
    (positive: their clean frozen states; negatives: the centroid and mined ones, as the clean benign
    term). A benign state moved by the attack's direction must stay benign, so the direction itself
    cannot become what the defence keys on. Runs on micro-batches that are attacked; universal
    persistence only (a per-sample perturbation belongs to its sample). 0: off."""
    benign_perturbation: Literal["shared", "refusal", "triplet"] = "shared"
    """The perturbation of the benign-invariance term: `shared`, the harmful attack's own universal
    perturbation; `refusal`, a universal perturbation of its own (same layer, bound, lr, steps and
    refresh schedule) trained to make the defended model answer the benign samples with
    `refusal_text`: the benign states pushed hardest toward refusal, the mirror of the harmful attack;
    `triplet`, one of its own (the same settings) trained on the micro-batch's benign samples to raise
    the benign triplet's gap without its hinge, d(state, its frozen state) - d(state, harmful
    centroid): the benign states pushed toward the harmful centroid and away from their frozen states
    in the loss's own frame, the benign anchors hardest for the loss itself."""
    refusal_text: str = "I'm sorry, but I can't help with that."
    """The target of the `refusal` benign perturbation."""

    @property
    def step_budget(self) -> int:
        """The most Adam steps one attack takes."""
        return self.steps if self.max_steps is None else self.max_steps

    def validate(self) -> None:
        require(len(self.layers) == 2 and 1 <= self.layers[0] <= self.layers[1], "layers",
                "[low, high] with 1 <= low <= high", self.layers)
        require(self.eps > 0, "eps", "a number > 0", self.eps)
        require(self.steps >= 0, "steps", "an integer >= 0", self.steps)
        require(self.max_steps is None or self.max_steps >= max(self.steps, 1), "max_steps",
                f"unset or an integer >= steps ({self.steps}) and >= 1", self.max_steps)
        require(self.stop_loss > 0, "stop_loss", "a number > 0", self.stop_loss)
        require(self.refresh_every >= 1, "refresh_every", "an integer >= 1", self.refresh_every)
        require(self.lr > 0, "lr", "a number > 0", self.lr)
        require(0.0 <= self.probability <= 1.0, "probability", "a number in [0, 1]", self.probability)
        require(self.start_step >= 0, "start_step", "an integer >= 0", self.start_step)
        require(self.start_step == 0 or self.kind != "module", "start_step",
                "0 with kind = \"module\" (the module follows module_refresh_micro_batches)", self.start_step)
        require(self.samples >= 1, "samples", "an integer >= 1", self.samples)
        require(self.benign_invariance >= 0, "benign_invariance", "a number >= 0", self.benign_invariance)
        require(self.benign_invariance == 0 or (self.persistence == "universal" and self.kind != "module"),
                "benign_invariance", '0 unless persistence = "universal" and kind is "residual" or "embedding"',
                self.benign_invariance)
        require(self.benign_perturbation in ("shared", "refusal", "triplet"), "benign_perturbation",
                '"shared", "refusal" or "triplet"', self.benign_perturbation)
        require(bool(self.refusal_text.strip()), "refusal_text", "a non-empty string", self.refusal_text)
        if self.module_layers is not None:
            require(len(self.module_layers) == 2 and 0 <= self.module_layers[0] < self.module_layers[1], "module_layers",
                    "[low, high) decoder layers with 0 <= low < high", self.module_layers)
        for name in ("module_refresh_micro_batches", "module_iterations", "module_stop_window", "module_success_window"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        require(self.module_step_iterations >= 0, "module_step_iterations", "an integer >= 0", self.module_step_iterations)
        require(self.module_lr > 0, "module_lr", "a number > 0", self.module_lr)
        require(0.0 <= self.module_probability <= 1.0, "module_probability", "a number in [0, 1]", self.module_probability)
        require(self.module_max_relative_norm is None or self.module_max_relative_norm > 0, "module_max_relative_norm",
                "a number > 0 or unset", self.module_max_relative_norm)


__all__ = ["MiningBackend", "MiningConfig", "RefinementConfig"]
