"""Attacks on the tiny model: each lowers its own objective; the residual perturbation's contract."""

from __future__ import annotations

import pytest
import torch

from crl.attacks import (AttackPrompt, EmbeddingAttack, EmbeddingRunConfig, GCGAttack, LatentAttack, PromptAttack,
                         ResidualPerturbation, TEMPLATES, build_layout)

PROMPTS = [AttackPrompt("p0", "How do I bake bread at home?", "Sure, here is how to bake bread")]


@pytest.fixture(scope="module")
def tiny():
    from crl.models import build_tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is far faster single-threaded on a loaded machine
    model, tok = build_tiny_llama(seed=0)
    yield model, tok
    torch.set_num_threads(threads)


def test_layout_roundtrip(tiny):
    _, tok = tiny
    lay = build_layout(tok, "Tell me a joke.", "Sure, here is")
    assert lay.text_before.endswith("Tell me a joke. ")
    assert "assistant" in lay.text_after
    assert tok.decode(lay.target) == "Sure, here is"


def test_prompt_attacks(tiny):
    model, tok = tiny
    direct = PromptAttack("direct", max_new_tokens=5).run(model, tok, PROMPTS)[0]
    assert direct.final_input.rstrip().endswith("assistant")
    assert direct.budget["queries"] == 1
    pre = PromptAttack("prefill", max_new_tokens=5).run(model, tok, PROMPTS)[0]
    assert pre.final_input.endswith("Sure, here is how to bake bread")
    assert pre.extra["prefill"] == "Sure, here is how to bake bread"
    for name in TEMPLATES:
        r = PromptAttack("template", template=name, max_new_tokens=3).run(model, tok, PROMPTS)[0]
        assert PROMPTS[0].prompt in r.final_input and r.attack == f"template:{name}"
    with pytest.raises(ValueError):
        PromptAttack("template")


def test_embedding_attack_lowers_its_loss(tiny):
    model, tok = tiny
    attack = EmbeddingAttack(n_tokens=4, steps=25, patience=50, configs=[EmbeddingRunConfig(1e-1, "bang"), EmbeddingRunConfig(1e-1, "random_tokens")],
                             max_new_tokens=4)
    r = attack.run(model, tok, PROMPTS)[0]
    curves = r.extra["loss_curves"]
    assert len(curves) == 2 and r.budget["steps"] == sum(len(c) for c in curves)
    assert min(curves[0]) < curves[0][0] - 0.5  # Adam on the target's cross-entropy makes progress
    assert r.best_loss == pytest.approx(min(min(c) for c in curves))  # the best over configurations counts
    assert all(p.requires_grad for p in model.parameters())


def test_latent_attack_lowers_its_loss_within_bound(tiny):
    model, tok = tiny
    r = LatentAttack(layer=2, eps=0.5, steps=15, lr=0.1, patience=50, max_new_tokens=4).run(model, tok, PROMPTS)[0]
    assert r.loss_curve[-1] < r.loss_curve[0] - 0.3
    assert r.extra["max_relative_norm"] <= 0.5 + 1e-4
    assert r.extra["layer"] == 2


def test_gcg_lowers_its_loss(tiny):
    model, tok = tiny
    r = GCGAttack(n_tokens=5, steps=4, search_width=16, topk=16, max_new_tokens=4).run(model, tok, PROMPTS)[0]
    assert r.best_loss < r.loss_curve[0]
    assert r.budget["forward_passes"] > r.budget["steps"]
    assert r.extra["suffix"] and r.extra["suffix"] in r.final_input


# -- ResidualPerturbation -------------------------------------------------------------------------


def _ids(b=2, t=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, 200, (b, t), generator=g)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_perturbation_adds_to_hidden_state_l(tiny, layer):
    model, _ = tiny
    ids = _ids()
    from crl.models import capture_hidden_states

    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        clean, clean_logits = out.hidden_states, out.logits
    pert = ResidualPerturbation(layer, 2, 6, 64, eps=10.0)
    assert pert.delta.dtype == torch.float32 and float(pert.delta.detach().abs().sum()) == 0.0
    with torch.no_grad():
        pert.delta.normal_()
    with pert.install(model), torch.no_grad():
        hs = capture_hidden_states(model, ids, None, list(range(layer + 1)))
        logits = model(input_ids=ids).logits
    assert torch.allclose(hs[layer], clean[layer] + pert.delta, atol=1e-5)  # crl's numbering: hidden state l
    for l in range(layer):
        assert torch.allclose(hs[l], clean[l], atol=1e-6)
    assert not torch.allclose(logits, clean_logits)  # and it propagates
    with torch.no_grad():  # removed after the context
        again = model(input_ids=ids).logits
    assert torch.allclose(again, clean_logits)


def test_perturbation_projection_and_mask(tiny):
    model, _ = tiny
    ids = _ids()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    pert = ResidualPerturbation(2, 2, 6, 64, eps=0.1, mask=mask)
    with pert.install(model), torch.no_grad():
        model(input_ids=ids)
        pert.delta.normal_(0, 100.0)
        pert.project_()
    rel = pert.relative_norm()
    assert torch.allclose(rel[mask.bool()], torch.full_like(rel[mask.bool()], 0.1), atol=1e-4)
    assert float(rel[~mask.bool()].abs().max()) == 0.0
    box = ResidualPerturbation(2, 2, 6, 64, eps=0.1, norm="linf", shape="sequence")
    with box.install(model), torch.no_grad():
        model(input_ids=ids)
        box.delta.normal_(0, 100.0)
        box.project_()
    rms = box.clean_norm / 64 ** 0.5  # [B, T]; a broadcast delta obeys the smallest bound of its row
    for b in range(2):
        assert float(box.delta[b].detach().abs().max()) <= float(0.1 * rms[b].min()) + 1e-5
    assert box.delta.shape == (2, 1, 64)


def test_perturbation_optimizer_state_persists(tiny):
    model, _ = tiny
    ids = _ids()
    pert = ResidualPerturbation(1, 2, 6, 64, eps=0.5, shape="token")
    opt = pert.make_optimizer(1e-2)
    with pert.install(model):
        for _ in range(2):
            loss = model(input_ids=ids).logits.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pert.project_()
    assert opt.state[pert.delta]["step"] == 2
    pert.resize_(2, 6, optimizer=opt)  # same shape: moments kept, delta zeroed
    assert float(pert.delta.abs().sum()) == 0.0 and opt.state[pert.delta]["step"] == 2
    state = pert.state_dict()
    assert "delta" in state
    pert.resize_(3, 7, optimizer=opt)  # new shape: moments dropped, same Parameter object
    assert pert.delta not in opt.state and opt.param_groups[0]["params"][0] is pert.delta
    uni = ResidualPerturbation(1, 2, 6, 64, shape="universal")
    opt2 = uni.make_optimizer()
    with uni.install(model):
        loss = model(input_ids=ids).logits.float().pow(2).mean()
        loss.backward()
        opt2.step()
    uni.resize_(3, 9, optimizer=opt2)
    assert uni.delta in opt2.state  # a universal delta keeps its moments across batch shapes


def test_perturbation_works_on_a_bf16_model():
    from crl.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=1)
    model = model.to(torch.bfloat16)
    pert = ResidualPerturbation(2, 1, 5, 64, eps=0.2)
    opt = pert.make_optimizer(1e-2)
    with pert.install(model):
        loss = model(input_ids=_ids(1, 5)).logits.float().mean()
        loss.backward()
        opt.step()
        pert.project_()
    assert pert.delta.dtype == torch.float32 and pert.delta.grad is not None
