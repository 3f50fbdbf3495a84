"""The judge a `JudgeConfig` describes."""

from __future__ import annotations

from typing import Any

from crl.evaluation.judges.base import Judge, PerplexityFn
from crl.evaluation.judges.classifier import ClassifierJudge
from crl.evaluation.judges.coherence import CoherenceJudge
from crl.evaluation.judges.combined import CombinedJudge
from crl.evaluation.judges.heads import CONTENT_HEAD_FILE, REFUSAL_HEAD_FILE, ContentHead, RefusalHead, load_head
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
            **heads(cfg.refusal_head, cfg.content_head, semantic, cfg.heads_dir),
        )
    if kind == "classifier":
        if not cfg.classifier_path:
            raise ValueError("judge kind 'classifier' needs classifier_path (a local Hugging Face folder)")
        return ClassifierJudge(cfg.classifier_path, cfg.classifier_format)
    raise ValueError(f"unknown judge kind {kind!r}")


def heads(refusal: bool, content: bool, semantic: SemanticJudge | None, folder: str | None = None) -> dict[str, Any]:
    """The learned heads of a combined judge, as keyword arguments of `CombinedJudge`: the refusal
    head when asked for and a sentence embedder is there (it shares the semantic judge's), the
    content head when asked for; from `folder` (default: the shipped weights). A folder without a
    head's file is an error; the shipped folder lacking one leaves that head out."""
    out: dict[str, Any] = {}
    for wanted, name in ((refusal and semantic is not None, REFUSAL_HEAD_FILE), (content, CONTENT_HEAD_FILE)):
        if not wanted:
            continue
        head = load_head(folder, name)
        if head is None and folder:
            raise FileNotFoundError(f"judge.heads_dir: {folder} has no {name}")
        if head is not None and name == REFUSAL_HEAD_FILE:
            out["refusal_head"] = RefusalHead(head, semantic.embedder)
        elif head is not None:
            out["content_head"] = ContentHead(head)
    return out


__all__ = ["build_judge", "heads"]
