"""Jailbreak attacks for evaluation (and the latent perturbation reused by training).

- `PromptAttack`: direct request, prefilling, template jailbreaks (`TEMPLATES`);
- `EmbeddingAttack`: a soft suffix of token embeddings optimised with Adam;
- `LatentAttack` / `ResidualPerturbation`: a bounded perturbation of the residual stream;
- `GCGAttack`: greedy coordinate gradient over a discrete suffix.

Each returns one `AttackResult` per `AttackPrompt`; success is decided by a judge afterwards.
"""

from crl.attacks.base import AttackPrompt, AttackResult, DEFAULT_TARGET, build_layout
from crl.attacks.embedding import EmbeddingAttack, EmbeddingRunConfig
from crl.attacks.gcg import GCGAttack
from crl.attacks.latent import LatentAttack, ResidualPerturbation
from crl.attacks.prompting import TEMPLATES, PromptAttack

__all__ = [
    "AttackPrompt", "AttackResult", "DEFAULT_TARGET", "build_layout", "EmbeddingAttack", "EmbeddingRunConfig",
    "GCGAttack", "LatentAttack", "ResidualPerturbation", "PromptAttack", "TEMPLATES",
]
