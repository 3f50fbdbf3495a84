"""Coherence: the degeneracy tests, and the response's perplexity under the base model."""

from __future__ import annotations

import math
from typing import Sequence

from crl.evaluation.judges.base import Judgement, PerplexityFn
from crl.evaluation.judges.degeneracy import DegeneracyThresholds, degeneracy_reasons

class CoherenceJudge:
    """Flags degenerate text (explicit tests, see `degeneracy_stats`) and, when a perplexity scorer is
    given (the base model, `crl.evaluation.capability.response_perplexity`), text whose perplexity
    exceeds `max_perplexity`. Perplexity alone misses loops (a loop has LOW perplexity once started),
    hence both. Verdict: ``incoherent`` or ``compliance`` (meaning: coherent)."""

    name = "coherence"

    def __init__(self, perplexity_fn: PerplexityFn | None = None, *, max_perplexity: float = 60.0,
                 thresholds: DegeneracyThresholds | None = None):
        self.perplexity_fn = perplexity_fn
        self.max_perplexity = max_perplexity
        self.thresholds = thresholds or DegeneracyThresholds()

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        ppl = self.perplexity_fn(prompts, responses) if self.perplexity_fn is not None else [float("nan")] * len(responses)
        out = []
        for q, r, p in zip(prompts, responses, ppl):
            reasons, stats = degeneracy_reasons(r, self.thresholds, q)
            stats = dict(stats)
            stats["perplexity"] = float(p)
            if math.isfinite(p) and p > self.max_perplexity:
                reasons.append("high_perplexity")
            out.append(Judgement("incoherent" if reasons else "compliance", stats, reasons))
        return out


__all__ = ["CoherenceJudge"]
