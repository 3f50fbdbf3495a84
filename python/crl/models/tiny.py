"""A tiny random Llama and its byte-level BPE tokenizer, built in-process (no download), for tests."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# SmolLM2-style ChatML template (SmolLM2 adds a default system prompt when none is given; so does this).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)




_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_TINY_NUM_MERGES = 384
_TINY_CORPUS = """\
You are a helpful assistant. The user asks a question and the assistant answers it.
How do I make a cake? Mix the flour, the sugar and the eggs, then bake it in the oven for forty minutes.
Write a Python function that returns the sum of a list of numbers. def total(values): return sum(values)
What is the capital of France? The capital of France is Paris. It is a city on the river Seine.
I can't help with that request. I'm sorry, but I cannot assist with this. Sure, here is a short answer.
Explain how photosynthesis works. Plants use light, water and carbon dioxide to make sugar and oxygen.
Tell me about the history of the Roman empire, the republic, the emperors and the fall of the city.
Please write a poem about the sea, the wind, the rain and the long road home in the evening light.
How can I kill a Python process? Use the kill command with the process id, or press control and C.
What is the best way to learn a new language? Practice every day, read books and talk with people.
system user assistant question answer request response model data train test example the a an of in on
to and for with that this what how why when where which who is are was were be been have has had do does
""".strip()


def _train_tiny_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small deterministic byte-level BPE (pure Python, ties broken lexicographically).

    The byte alphabet makes the tokenizer lossless on any text; the merges make tokens span several
    characters, as real tokenizers do, so that mask-boundary code is exercised.
    """
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(corpus))
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(_TINY_SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    splits = {w: list(w) for w in sorted(words)}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merged = a + b
        merges.append((a, b))
        if merged not in vocab:
            vocab[merged] = len(vocab)
        for w, parts in splits.items():
            if len(parts) < 2:
                continue
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return vocab, merges


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A small byte-level BPE tokenizer built in-process (no download) with a ChatML chat template.

    Special tokens: ``<|endoftext|>`` (bos), ``<|im_start|>``, ``<|im_end|>`` (eos, end of turn) and
    ``<|pad|>`` (pad). Lossless on any UTF-8 text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _train_tiny_bpe(_TINY_CORPUS, _TINY_NUM_MERGES)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_TINY_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_llama(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 128,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny random Llama (GQA, tied embeddings) and its in-process tokenizer; deterministic given seed."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    num_kv_heads = num_heads // 2 if num_heads % 2 == 0 else num_heads
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # larger than usual so that the random model's outputs are not uniform
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.config.name_or_path = f"tiny:{seed}"
    model.eval()
    return model, tokenizer


__all__ = ["CHATML_TEMPLATE", "build_tiny_llama", "build_tiny_tokenizer"]
