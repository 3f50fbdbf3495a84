"""Capability and harmfulness measurements that need no judge, or only the coherence/semantic ones.

- `response_token_logprobs`: log-probabilities of the response tokens of chat conversations.
- `response_nll` / `response_perplexity`: mean NLL (and its exp) of responses given prompts; the
  perplexity under the base model is the coherence judge's scorer; the NLL of harmful continuations
  (AdvBench targets, the base model's own harmful completions) under each model measures
  harmfulness without any judge (higher = the model is less willing to say it).
- `kl_to_base`: mean per-token KL(base || model) of the next-token distributions on benign
  conversations (the base model's own answers), and the model's perplexity on them.
- `answer_retention`: cosine similarity (sentence embeddings) of each model's answers to the base
  model's answers on benign prompts.
- `run_lm_eval`: an optional hook to lm-evaluation-harness, used only if `lm_eval` is importable and
  the tasks are available locally.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from crl.generation import chat_prompt_text


def _encode_pairs(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], system_prompt: str | None):
    out = []
    for p, r in zip(prompts, responses):
        ptxt = chat_prompt_text(tokenizer, p, system_prompt)
        pids = tokenizer(ptxt, add_special_tokens=False)["input_ids"]
        rids = tokenizer(r, add_special_tokens=False)["input_ids"] if r else []
        out.append((pids, rids))
    return out


@torch.no_grad()
def response_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *,
                            batch_size: int = 4, system_prompt: str | None = None, max_response_tokens: int = 128,
                            full: bool = False) -> list[torch.Tensor]:
    """Per pair: the log-probability of each response token [Tr] (or, with `full`, the whole
    log-softmax over the vocabulary at the response positions [Tr, V], for KL)."""
    dev = next(model.parameters()).device
    pairs = _encode_pairs(tokenizer, prompts, responses, system_prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[torch.Tensor | None] = [None] * len(pairs)
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        seqs = [(p, r[:max_response_tokens]) for p, r in chunk]
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (p, r) in enumerate(seqs):  # right padding: positions are the natural ones
            s = p + r
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float()
        for row, (p, r) in enumerate(seqs):
            if not r:
                out[i + row] = torch.zeros(0, logits.shape[-1]) if full else torch.zeros(0)
                continue
            lp = torch.log_softmax(logits[row, len(p) - 1 : len(p) - 1 + len(r)], -1).cpu()
            out[i + row] = lp if full else lp.gather(-1, torch.tensor(r).view(-1, 1)).squeeze(-1)
    return [x if x is not None else torch.zeros(0) for x in out]


def response_nll(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], **kw: Any) -> list[float]:
    """Mean negative log-likelihood per response token (nan for an empty response)."""
    return [float(-lp.mean()) if lp.numel() else float("nan") for lp in response_token_logprobs(model, tokenizer, prompts, responses, **kw)]


def response_perplexity(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], **kw: Any) -> list[float]:
    return [math.exp(min(x, 50.0)) if math.isfinite(x) else float("nan") for x in response_nll(model, tokenizer, prompts, responses, **kw)]


def kl_to_base(base_logprobs: Sequence[torch.Tensor], model_logprobs: Sequence[torch.Tensor], response_ids: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Mean per-token KL(base || model) over all response positions, and (with the response ids)
    the model's perplexity on the responses."""
    kls, nlls = [], []
    for k, (b, m) in enumerate(zip(base_logprobs, model_logprobs)):
        if b.numel() == 0:
            continue
        kl = (b.exp() * (b - m)).sum(-1)
        kls.append(kl)
        if response_ids is not None:
            ids = torch.tensor(list(response_ids[k])[: m.shape[0]]).view(-1, 1)
            nlls.append(-m.gather(-1, ids).squeeze(-1))
    res = {"kl": float(torch.cat(kls).mean()) if kls else float("nan"), "tokens": int(sum(x.numel() for x in kls))}
    if nlls:
        nll = float(torch.cat(nlls).mean())
        res["nll"] = nll
        res["perplexity"] = math.exp(min(nll, 50.0))
    return res


def answer_retention(embedder: Any, base_answers: Sequence[str], model_answers: Sequence[str]) -> dict[str, float]:
    """Cosine similarity of sentence embeddings of each answer to the base model's answer."""
    if not base_answers:
        return {"mean": float("nan"), "n": 0}
    a = embedder.encode(list(base_answers))
    b = embedder.encode(list(model_answers))
    sims = (a * b).sum(-1)
    return {"mean": float(sims.mean()), "min": float(sims.min()), "n": len(base_answers), "per_prompt": [float(x) for x in sims]}


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = 50, batch_size: int = 4,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """lm-evaluation-harness on `tasks` (must be available offline). Skipped with a message when
    lm_eval is not installed or fails (e.g. a task needs a download)."""
    if not tasks:
        return {}
    if not lm_eval_available():
        log("lm-eval: `lm_eval` is not installed; skipping the lm-eval tasks " + ", ".join(tasks))
        return {"skipped": "lm_eval not installed"}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
        return {"results": res.get("results", {})}
    except Exception as exc:  # offline task data missing, API drift: skip, do not fail the evaluation
        log(f"lm-eval: skipped ({type(exc).__name__}: {exc})")
        return {"skipped": f"{type(exc).__name__}: {exc}"}


__all__ = ["response_token_logprobs", "response_nll", "response_perplexity", "kl_to_base", "answer_retention",
           "run_lm_eval", "lm_eval_available"]
