"""Adversarial refinement: it raises the defended model's likelihood of the harmful response inside its
bound, keeps its state, and a tiny run with mining and refinement trains and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crl.data import collate, encode_example, load_demo
from crl.models import apply_lora, build_tiny_llama
from crl.training.config import RefinementConfig, load_train_config
from crl.mining.refinement import AdversarialRefiner, hardest_owners, response_cross_entropy
from crl.training.step import token_selection
from crl.training.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def encoded(tiny_tokenizer):
    examples = [ex.with_response("Sure, here is how to do it. Step one: begin.") for ex in load_demo("harmful", "train")[:4]]
    return [encode_example(tiny_tokenizer, ex, max_length=192) for ex in examples]


def _refiner(model, tokenizer, encoded, **cfg):
    config = RefinementConfig(enabled=True, **cfg)
    config.validate()
    return AdversarialRefiner(config, model, encoded, tokenizer.pad_token_id,
                              lambda b: token_selection(b, "response", 16), seed=0)


def _clean_ce(model, tokenizer, encoded, ids):
    batch = collate([encoded[i] for i in ids], tokenizer.pad_token_id)
    with torch.no_grad():
        return float(response_cross_entropy(model, batch.input_ids, batch.attention_mask, batch.response_mask).mean())


@pytest.mark.parametrize("target,norm", [("residual", "l2"), ("residual", "linf"), ("embedding", "l2")])
def test_refinement_raises_the_harmful_likelihood_inside_its_bound(tiny_model, encoded, target, norm):
    base, tokenizer = tiny_model
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2, 3])
    eps = 0.5
    refiner = _refiner(model, tokenizer, encoded, kind=target, norm=norm, layers=[2, 2], eps=eps, steps=12, lr=0.3)
    ids = [0, 1]
    clean = _clean_ce(model, tokenizer, encoded, ids)
    out = refiner.refine(model, ids, step=0, layers=[2, 3])
    assert out.metrics["attack_loss"] < out.metrics["attack_loss_start"] <= clean + 1e-4
    # the attack lowered the cross-entropy of the harmful response under the defended model
    layer = 0 if target == "embedding" else 2
    pert = refiner.perturbations[layer]
    with pert.install(model):
        attacked = _clean_ce(model, tokenizer, encoded, ids)
    assert attacked < clean - 0.05, (clean, attacked)
    # ... and stayed inside its bound, relative to the clean hidden states
    rel = pert.relative_norm()
    if norm == "l2":
        assert float(rel.max()) <= eps * (1 + 1e-4)
    else:
        batch = collate([encoded[i] for i in ids], tokenizer.pad_token_id)
        from crl.models import capture_hidden_states

        with torch.no_grad():
            h = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [layer])[layer]
        rms = h.float().norm(dim=-1) / h.shape[-1] ** 0.5
        prompt = batch.attention_mask.bool() & ~batch.response_mask
        assert float(pert.delta.detach().abs().max()) <= eps * float(rms[prompt].min()) * (1 + 1e-4)
    # gradients went to the perturbation only, never to the LoRA weights; outputs have the right shape
    assert all(p.grad is None for p in model.parameters())
    assert set(out.trained) == {2, 3} and out.trained[3].requires_grad and not out.frozen[3].requires_grad
    assert out.trained[2].shape == out.frozen[2].shape == (2, out.selection.shape[1], 64)


def test_state_persists_across_refreshes_and_round_trips(tiny_model, encoded):
    base, tokenizer = tiny_model
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2, 3])
    refiner = _refiner(model, tokenizer, encoded, layers=[1, 1], steps=2, refresh_every=2)
    refiner.refine(model, [0, 1], step=0, layers=[2])
    opt = refiner.optimizers[1]
    assert int(opt.state[refiner.perturbations[1].delta]["step"]) == 2
    delta = refiner.perturbations[1].delta.detach().clone()
    assert float(delta.norm()) > 0
    out = refiner.refine(model, [2, 3], step=1, layers=[2])  # not a refresh step: applied as is
    assert "attack_loss" not in out.metrics
    assert int(opt.state[refiner.perturbations[1].delta]["step"]) == 2
    refiner.refine(model, [2], step=2, layers=[2])  # refresh: Adam continues (no fresh optimiser)
    assert int(opt.state[refiner.perturbations[1].delta]["step"]) == 4
    state = refiner.state_dict()
    other = _refiner(model, tokenizer, encoded, layers=[1, 1], steps=2, refresh_every=2)
    other.load_state_dict(state)
    assert torch.equal(other.perturbations[1].delta, refiner.perturbations[1].delta)
    assert other.last_refresh_step == 2
    assert int(other.optimizers[1].state[other.perturbations[1].delta]["step"]) == 4


def test_universal_installed_adds_the_delta_to_prompt_tokens_only(tiny_model, encoded):
    from crl.models import capture_hidden_states

    base, tokenizer = tiny_model
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2, 3])
    refiner = _refiner(model, tokenizer, encoded, layers=[2, 2], steps=3, eps=0.5, lr=0.3)
    refiner.refine(model, [0, 1], step=0, layers=[3])
    delta = refiner.perturbations[2].delta.detach().clone()
    assert float(delta.norm()) > 0
    batch = collate([encoded[i] for i in (2, 3)], tokenizer.pad_token_id)
    with torch.no_grad():
        clean = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [2])[2].float()
        with refiner.universal_installed(model, batch, step=0):
            moved = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [2])[2].float()
    prompt = batch.attention_mask.bool() & ~batch.response_mask
    # hand-computed: h + delta on the prompt tokens, h elsewhere
    expected = clean + delta.reshape(1, 1, -1) * prompt.unsqueeze(-1)
    assert torch.allclose(moved, expected, atol=1e-4)
    assert not torch.allclose(moved[prompt], clean[prompt], atol=1e-3)
    # the refiner's own perturbation is untouched, and nothing stays installed
    assert torch.equal(refiner.perturbations[2].delta.detach(), delta)
    with torch.no_grad():
        after = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [2])[2].float()
    assert torch.equal(after, clean)


def test_per_sample_attack_starts_fresh_every_call_and_stays_in_its_bound(tiny_model, encoded):
    base, tokenizer = tiny_model
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2, 3])
    eps = 0.5
    per_sample = _refiner(model, tokenizer, encoded, layers=[2, 2], eps=eps, steps=12, lr=0.3, refresh_every=5,
                          persistence="per_sample")
    ids = [0, 1]
    clean = _clean_ce(model, tokenizer, encoded, ids)
    first = per_sample.refine(model, ids, step=0, layers=[3])
    # from zero: the first loss is the clean one; the attack lowered it and stayed inside the bound
    assert first.metrics["attack_loss_start"] == pytest.approx(clean, rel=1e-4)
    assert first.metrics["attack_loss"] < clean - 0.05
    assert first.metrics["attack_rel_norm"] <= eps * (1 + 1e-4)
    # attacked at every call (refresh_every does not apply), again from zero
    second = per_sample.refine(model, ids, step=1, layers=[3])
    assert second.metrics["attack_loss_start"] == pytest.approx(clean, rel=1e-4)
    assert second.metrics["attack_loss"] == pytest.approx(first.metrics["attack_loss"], rel=1e-4)
    # its attacked states differ from the clean ones; the universal state is untouched
    with torch.no_grad():
        batch = collate([encoded[i] for i in ids], tokenizer.pad_token_id)
        from crl.models import capture_hidden_states

        clean_states = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [3])[3]
    assert not torch.allclose(first.trained[3].detach(), clean_states, atol=1e-4)
    assert float(per_sample.perturbations[2].delta.abs().max()) == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_adaptive_attack_steps_on_until_it_succeeds(tiny_model, encoded):
    """max_steps: at least `steps`, then on while the loss is above stop_loss; the states equal those of
    the fixed-step attack with the count it took."""
    base, tokenizer = tiny_model
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2, 3])
    common = dict(layers=[2, 2], eps=0.5, lr=0.3, persistence="per_sample")
    ids = [0, 1]
    clean = _clean_ce(model, tokenizer, encoded, ids)
    # a threshold the clean states already meet: exactly the minimum `steps`
    easy = _refiner(model, tokenizer, encoded, steps=2, max_steps=12, stop_loss=clean + 10, **common).refine(model, ids, 0, [3])
    assert easy.metrics["attack_steps"] == 2.0
    # one no attack reaches: the whole budget, like the fixed 12-step attack
    hard = _refiner(model, tokenizer, encoded, steps=2, max_steps=12, stop_loss=1e-6, **common).refine(model, ids, 0, [3])
    fixed = _refiner(model, tokenizer, encoded, steps=12, **common).refine(model, ids, 0, [3])
    assert hard.metrics["attack_steps"] == 12.0
    assert "attack_steps" not in fixed.metrics
    assert float(hard.metrics["attack_loss"]) == pytest.approx(float(fixed.metrics["attack_loss"]), rel=1e-5)
    torch.testing.assert_close(hard.trained[3], fixed.trained[3])
    # in between: it stops at the first step whose loss is below the threshold
    mid_loss = (float(fixed.metrics["attack_loss_start"]) + float(fixed.metrics["attack_loss"])) / 2
    mid = _refiner(model, tokenizer, encoded, steps=1, max_steps=12, stop_loss=mid_loss, **common).refine(model, ids, 0, [3])
    n = int(mid.metrics["attack_steps"])
    assert 1 <= n < 12 and float(mid.metrics["attack_loss"]) < mid_loss
    same = _refiner(model, tokenizer, encoded, steps=n, **common).refine(model, ids, 0, [3])
    torch.testing.assert_close(mid.trained[3], same.trained[3])
    with pytest.raises(Exception, match="max_steps"):
        RefinementConfig(enabled=True, steps=4, max_steps=2).validate()


def test_schedule_is_a_function_of_the_step(tiny_model, encoded):
    base, tokenizer = tiny_model
    refiner = _refiner(base, tokenizer, encoded, layers=[1, 3], refresh_every=3, probability=0.5)
    layers = [refiner.layer_at(s) for s in range(30)]
    assert set(layers) <= {1, 2, 3} and len(set(layers)) > 1
    assert all(layers[s] == layers[s - s % 3] for s in range(30))  # fixed within a refresh period
    uses = [refiner.use_at(s, 0) for s in range(200)]
    assert 60 < sum(uses) < 140 and uses == [refiner.use_at(s, 0) for s in range(200)]
    with pytest.raises(ValueError, match="refinement.layers"):
        _refiner(base, tokenizer, encoded, layers=[1, 4])  # hidden state 4 = the last: not a residual input
    warm = _refiner(base, tokenizer, encoded, layers=[1, 3], start_step=5)
    assert [warm.use_at(s, m) for s in range(8) for m in range(2)] == [False] * 10 + [True] * 6
    with pytest.raises(Exception, match="start_step"):
        RefinementConfig(enabled=True, kind="module", start_step=5).validate()


def test_hardest_owners_ranks_within_each_pool_and_alternates():
    import numpy as np

    owners = np.array([[3, 5], [5, -1]])
    scores = np.array([[0.2, 0.9], [0.4, -np.inf]])
    assert hardest_owners([[(owners, scores)], [(np.array([7]), np.array([0.5]))]], 2) == [5, 7]
    # the harmful pool's scores are all higher than the benign pool's: ranked on one scale, the benign
    # pool's owners would never be attacked; ranked within each pool, the pools alternate
    benign = [(np.array([1, 2, 3]), np.array([0.10, 0.30, 0.20]))]
    harmful = [(np.array([4, 5, 6]), np.array([0.90, 0.80, 0.95]))]
    assert hardest_owners([benign, harmful], 4) == [2, 6, 3, 4]
    assert hardest_owners([benign, harmful], 1) == [2]
    # an owner already chosen from one pool is skipped in the other; fewer candidates than asked
    assert hardest_owners([[(np.array([9, 8]), np.array([0.5, 0.4]))], [(np.array([9]), np.array([0.9]))]], 5) == [9, 8]


# --- a tiny run with mining and refinement -------------------------------------------------------------


@pytest.fixture(scope="module")
def pools_dir(make_toy_pools) -> Path:
    return make_toy_pools(8, 8, 2)


def _config(pools: Path, banks: Path, **overrides):
    sets = [
        f'data.pools="{pools}"', "optim.max_steps=4", "run.checkpoint_every=2", "lora.dropout=0.1",
        "mining.enabled=true", f'mining.cache_dir="{banks}"', "mining.k=2", "mining.queue_size=6",
        "refinement.enabled=true", "refinement.layers=[1, 2]", "refinement.steps=1", "refinement.refresh_every=2",
        "refinement.probability=0.75", "optim.grad_accumulation=2",
    ]
    sets += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_train_config(REPO / "configs" / "tiny.toml", sets)


def _run(config, out: Path, *, resume=False, max_steps=None) -> Trainer:
    model, tokenizer = build_tiny_llama(seed=0)
    trainer = Trainer(config, out, resume=resume, model=model, tokenizer=tokenizer)
    trainer.train(max_steps=max_steps)
    return trainer


def _metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("persistence", ["universal", "per_sample"])
def test_mining_and_refinement_train_and_resume_exactly(tmp_path, pools_dir, persistence):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_and_resume(tmp_path, pools_dir, persistence)
    finally:
        torch.set_num_threads(threads)


def test_warm_up_steps_train_without_the_attack(tmp_path, pools_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = _config(pools_dir, tmp_path / "banks", **{"refinement.start_step": 2, "refinement.probability": 1.0,
                                                          "refinement.refresh_every": 1})
        _run(config, tmp_path / "warm")
    finally:
        torch.set_num_threads(threads)
    rows = _metrics(tmp_path / "warm")
    # steps 1-2 (optimizer steps 0-1) mine but do not attack; steps 3-4 attack every micro-batch
    assert [("attack_loss" in m) for m in rows] == [False, False, True, True]
    assert all("loss_harmful_mined" in m for m in rows)


def _train_and_resume(tmp_path, pools_dir, persistence):
    banks = tmp_path / "banks"
    config = _config(pools_dir, banks, **{"refinement.persistence": persistence})
    straight = _run(config, tmp_path / "straight")
    assert not straight.miner.bank.reused
    _run(config, tmp_path / "split", max_steps=2)
    ckpt = tmp_path / "split" / "checkpoints" / "step-000002"
    assert (ckpt / "mining.safetensors").is_file() and (ckpt / "refinement.safetensors").is_file()
    resumed = _run(config, tmp_path / "split", resume=True)
    assert resumed.miner.bank.reused and resumed.miner.bank.path == straight.miner.bank.path
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    keys = ("loss", "loss_benign", "loss_harmful", "loss_benign_mined", "loss_harmful_mined", "loss_kl", "grad_norm",
            "mined_sim_benign", "mined_sim_harmful", "attack_loss", "attack_rel_norm", "hardest_changed_harmful")
    seen = set()
    for x, y in zip(a, b):
        for key in keys:
            assert (key in x) == (key in y), (x["step"], key)
            if key in x:
                seen.add(key)
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    # every mining/refinement metric was logged at some step
    assert {"loss_benign_mined", "loss_harmful_mined", "mined_sim_benign", "mined_sim_harmful", "attack_loss"} <= seen
    assert all("seconds_mining" in m for m in a)
    assert torch.equal(straight.miner.queue.vectors, resumed.miner.queue.vectors)
    for layer, pert in straight.refiner.perturbations.items():
        assert torch.allclose(pert.delta, resumed.refiner.perturbations[layer].delta, atol=1e-6)


@pytest.mark.parametrize("steps,perturbation", [(0, "shared"), (2, "shared"), (0, "refusal"), (2, "refusal"),
                                                (0, "triplet"), (2, "triplet")])
def test_benign_invariance_term_joins_the_loss(tmp_path, pools_dir, steps, perturbation):
    """With the perturbation at zero (no Adam steps) the perturbed benign term equals the clean one
    exactly; with an attack it differs; either way the loss is the sum of its logged terms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = _config(pools_dir, tmp_path / "banks", **{
            "refinement.benign_invariance": 0.5, "refinement.probability": 1.0, "refinement.refresh_every": 1,
            "refinement.steps": steps, "refinement.eps": 0.5, "lora.dropout": 0.0, "optim.max_steps": 2,
            "refinement.benign_perturbation": perturbation,
            # one micro-batch a step for "triplet": its first attack's gap is then the step's clean one
            **({"optim.grad_accumulation": 1} if perturbation == "triplet" else {})})
        _run(config, tmp_path / "inv")
    finally:
        torch.set_num_threads(threads)
    rows = _metrics(tmp_path / "inv")
    assert len(rows) == 2
    if perturbation == "refusal" and steps > 0:
        # the benign attack ran at every step and lowered the refusal's cross-entropy
        assert all(m["benign_attack_loss"] < m["benign_attack_loss_start"] for m in rows)
    if perturbation == "triplet" and steps > 0:
        # the benign attack ran at every step and raised the gap d(state, frozen) - d(state, centroid);
        # at step 1 it started from a zero perturbation (no dropout), so its first gap is the clean
        # benign rows' (from the logged mean distances), and the perturbed rows it handed to the
        # loss have a larger gap than the clean ones
        assert all(m["benign_attack_gap"] > m["benign_attack_gap_start"] for m in rows)
        first = rows[0]
        assert first["benign_attack_gap_start"] == pytest.approx(first["benign_d_pos"] - first["benign_d_neg"], abs=1e-4)
        assert (first["benign_perturbed_d_pos"] - first["benign_perturbed_d_neg"]
                > first["benign_d_pos"] - first["benign_d_neg"] + 1e-3)
    for m in rows:
        if steps == 0:
            assert m["loss_benign_perturbed"] == pytest.approx(m["loss_benign"], rel=1e-5, abs=1e-7)
            assert m["loss_benign_perturbed_mined"] == pytest.approx(m["loss_benign_mined"], rel=1e-5, abs=1e-7)
        w = 1.0  # mining.weight
        expected = (m["coef_benign"] * (m["loss_benign"] + w * m["loss_benign_mined"])
                    + m["coef_benign"] * 0.5 * (m["loss_benign_perturbed"] + w * m["loss_benign_perturbed_mined"])
                    + m["coef_harmful"] * (m["loss_harmful"] + w * m["loss_harmful_mined"])
                    + m["coef_kl"] * m["loss_kl"])
        assert m["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    if steps > 0:  # the perturbation moved the benign states (their loss may be 0 either way: all inactive)
        assert any(abs(m["benign_perturbed_d_neg"] - m["benign_d_neg"]) > 1e-6 for m in rows)


def test_benign_invariance_needs_a_universal_perturbation():
    with pytest.raises(ValueError, match="benign_invariance"):
        RefinementConfig(enabled=True, persistence="per_sample", benign_invariance=1.0).validate()
    with pytest.raises(ValueError, match="benign_invariance"):
        RefinementConfig(enabled=True, benign_invariance=-1.0).validate()


def test_refusal_perturbation_raises_the_refusal_likelihood_inside_its_bound(tiny_model, tiny_tokenizer):
    from crl.mining.refinement import with_response_tokens

    base, tokenizer = tiny_model
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2, 3])
    refusal = tokenizer("I'm sorry, but I can't help with that.", add_special_tokens=False)["input_ids"]
    benign = [with_response_tokens(encode_example(tokenizer, ex.with_response("Sure."), max_length=192), refusal)
              for ex in load_demo("benign", "train")[:4]]
    # the prompt is kept token for token and the refusal is the whole response
    assert benign[0].input_ids[benign[0].prompt_length:] == refusal and sum(benign[0].response_mask) == len(refusal)
    config = RefinementConfig(enabled=True, layers=[2, 2], eps=0.5, steps=12, lr=0.3, benign_invariance=1.0,
                              benign_perturbation="refusal")
    config.validate()
    refiner = AdversarialRefiner(config, model, benign, tokenizer.pad_token_id,
                                 lambda b: token_selection(b, "response", 16), seed=0, benign_examples=benign)
    ids = [0, 1, 2]
    clean = _clean_ce(model, tokenizer, benign, ids)
    values = refiner.refine_benign(model, ids, step=0)
    assert float(values["benign_attack_loss"]) < float(values["benign_attack_loss_start"])
    pert = refiner.benign_perturbations[2]
    with pert.install(model):
        attacked = _clean_ce(model, tokenizer, benign, ids)
    assert attacked < clean - 0.05, (clean, attacked)
    assert float(pert.relative_norm().max()) <= 0.5 * (1 + 1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert float(refiner.perturbations[2].delta.detach().abs().max()) == 0.0  # the harmful one untouched
    assert refiner.refine_benign(model, ids, step=0) == {}  # one refresh per step
    # checkpoint round trip
    other = AdversarialRefiner(config, model, benign, tokenizer.pad_token_id,
                               lambda b: token_selection(b, "response", 16), seed=0, benign_examples=benign)
    other.load_state_dict(refiner.state_dict())
    assert torch.equal(other.benign_perturbations[2].delta, pert.delta) and other.last_benign_refresh_step == 0


def test_triplet_perturbation_lowers_its_objective_inside_its_bound(tiny_model, tiny_tokenizer):
    """`refine_benign_triplet` with a hand-written objective in the place of the negated triplet loss
    (the negated distance of the prompt states at hidden state 3 from a fixed point, so the attack
    pushes them away): Adam steps on the benign perturbation only, inside the bound, once per step,
    checkpointed."""
    base, tokenizer = tiny_model
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2, 3])
    benign = [encode_example(tokenizer, ex.with_response("Sure."), max_length=192) for ex in load_demo("benign", "train")[:3]]
    batch = collate(benign, tokenizer.pad_token_id)
    config = RefinementConfig(enabled=True, layers=[2, 2], eps=0.5, steps=8, lr=0.3, benign_invariance=1.0,
                              benign_perturbation="triplet")
    config.validate()
    refiner = AdversarialRefiner(config, model, benign, tokenizer.pad_token_id,
                                 lambda b: token_selection(b, "response", 16), seed=0)
    target = torch.randn(base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    prompt = batch.attention_mask.bool() & ~batch.response_mask.bool()

    def distance() -> torch.Tensor:
        from crl.models import capture_hidden_states

        states = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [3])[3]
        return (states[prompt] - target).norm(dim=-1).mean()

    with torch.no_grad():
        clean = float(distance())
    values = refiner.refine_benign_triplet(model, batch, 0, lambda: -distance())
    # the metrics are the negated objective (the distance here) at the first and the last Adam step
    assert float(values["benign_attack_gap_start"]) == pytest.approx(clean, rel=1e-5)
    assert float(values["benign_attack_gap"]) > clean
    pert = refiner.benign_perturbations[2]
    with torch.no_grad(), pert.install(model):
        attacked = float(distance())
    assert attacked > float(values["benign_attack_gap"]) > clean, (clean, attacked)
    assert float(pert.relative_norm().max()) <= 0.5 * (1 + 1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert float(refiner.perturbations[2].delta.detach().abs().max()) == 0.0  # the harmful one untouched
    assert refiner.refine_benign_triplet(model, batch, 0, lambda: -distance()) == {}  # one refresh per step
    other = AdversarialRefiner(config, model, benign, tokenizer.pad_token_id,
                               lambda b: token_selection(b, "response", 16), seed=0)
    other.load_state_dict(refiner.state_dict())
    assert torch.equal(other.benign_perturbations[2].delta, pert.delta) and other.last_benign_refresh_step == 0


@pytest.mark.parametrize("perturbation,attack_key", [("refusal", "benign_attack_loss"),
                                                     ("triplet", "benign_attack_gap")])
def test_benign_perturbation_trains_and_resumes_exactly(tmp_path, pools_dir, perturbation, attack_key):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = _config(pools_dir, tmp_path / "banks", **{"refinement.benign_invariance": 1.0,
                                                          "refinement.benign_perturbation": perturbation})
        straight = _run(config, tmp_path / "straight")
        _run(config, tmp_path / "split", max_steps=2)
        resumed = _run(config, tmp_path / "split", resume=True)
    finally:
        torch.set_num_threads(threads)
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert any(attack_key in m for m in a)
    for x, y in zip(a, b):
        for key in ("loss", "loss_benign_perturbed", attack_key, "grad_norm"):
            assert (key in x) == (key in y), (x["step"], key)
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    for layer, pert in straight.refiner.benign_perturbations.items():
        assert torch.allclose(pert.delta, resumed.refiner.benign_perturbations[layer].delta, atol=1e-6)
