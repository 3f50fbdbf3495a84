"""The judge a `JudgeConfig` describes."""

from __future__ import annotations

from typing import Any

from crl.evaluation.judges.base import Judge, PerplexityFn
from crl.evaluation.judges.classifier import ClassifierJudge
from crl.evaluation.judges.coherence import CoherenceJudge
from crl.evaluation.judges.combined import CombinedJudge
from crl.evaluation.judges.refusal import RefusalStringJudge
from crl.evaluation.judges.semantic import SemanticJudge, default_sentence_model_path

def build_judge(cfg: Any, *, perplexity_fn: PerplexityFn | None = None) -> Judge:
    """A judge from a `JudgeConfig` (see crl.evaluation.config)."""
    kind = cfg.kind
    th = cfg.degeneracy
    if kind == "refusal_string":
        return RefusalStringJudge(cfg.refusal_mode)
    if kind == "coherence":
        return CoherenceJudge(perplexity_fn if cfg.use_perplexity else None, max_perplexity=cfg.max_perplexity, thresholds=th)
    if kind == "semantic":
        return SemanticJudge(model_path=cfg.semantic_model, on_topic_threshold=cfg.on_topic_threshold,
                             refusal_threshold=cfg.refusal_similarity_threshold)
    if kind == "combined":
        semantic = None
        if cfg.use_semantic:
            path = cfg.semantic_model or default_sentence_model_path()
            if path is not None:
                semantic = SemanticJudge(model_path=path, on_topic_threshold=cfg.on_topic_threshold,
                                         refusal_threshold=cfg.refusal_similarity_threshold)
        return CombinedJudge(
            coherence=CoherenceJudge(perplexity_fn if cfg.use_perplexity else None, max_perplexity=cfg.max_perplexity, thresholds=th),
            refusal=RefusalStringJudge(cfg.refusal_mode),
            semantic=semantic,
            use_semantic=False,
        )
    if kind == "classifier":
        if not cfg.classifier_path:
            raise ValueError("judge kind 'classifier' needs classifier_path (a local Hugging Face folder)")
        return ClassifierJudge(cfg.classifier_path, cfg.classifier_format)
    raise ValueError(f"unknown judge kind {kind!r}")


__all__ = ["build_judge"]
