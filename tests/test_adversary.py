"""The paper's adversary module (refinement.kind = "module", crl.mining.adversary)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crl.data import collate, encode_example, load_demo
from crl.mining.adversary import AdversaryModule, ModuleAdversary
from crl.mining.config import RefinementConfig
from crl.mining.refinement import response_cross_entropy
from crl.models import apply_lora, build_tiny_llama
from crl.training.config import load_train_config
from crl.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_module_starts_at_identity_plus_residual():
    """Linear weight I and bias 1e-7, added to the residual stream: h -> 2h + 1e-7 at initialisation
    (the reference's add_attack_module); with a bound, the change is at most that fraction of ||h||."""
    module = AdversaryModule(6)
    h = torch.randn(2, 3, 6)
    torch.testing.assert_close(module(h), 2 * h + 1e-7)
    bounded = AdversaryModule(6, max_relative_norm=0.1)
    change = bounded(h) - h
    assert torch.all(change.norm(dim=-1) <= 0.1 * h.norm(dim=-1) * (1 + 1e-5))


@pytest.fixture(scope="module")
def harmful_examples(tiny_tokenizer):
    examples = [ex.with_response("Sure, here is how to do it. Step one: begin.") for ex in load_demo("harmful", "train")[:6]]
    return [encode_example(tiny_tokenizer, ex, max_length=192) for ex in examples]


def _adversary(model, tokenizer, examples, **cfg):
    config = RefinementConfig(enabled=True, kind="module", **cfg)
    config.validate()
    return ModuleAdversary(config, model, examples, tokenizer.pad_token_id, seed=0)


def test_schedule_training_and_gate(harmful_examples, tiny_tokenizer):
    model, tokenizer = build_tiny_llama(seed=0)
    peft = apply_lora(model, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2, 3])
    adversary = _adversary(peft, tokenizer, harmful_examples, module_refresh_micro_batches=3, module_iterations=5,
                           module_stop_window=50, module_lr=0.05, module_probability=1.0, module_success_loss=1e9)
    assert adversary.layer_range == (0, 1)  # 10 of 32 decoder layers, scaled to the tiny model's 4
    lora = [p for p in peft.parameters() if p.requires_grad]
    # no adversary before the refresh period's first end (the reference's first module at micro-batch 40)
    for _ in range(2):
        assert "adversary_loss" not in adversary.before_micro_batch(peft)
        assert not adversary.use_now()
    values = adversary.before_micro_batch(peft)  # micro-batch 3: a new module, trained 5 iterations
    assert values["adversary_iterations"] == 5 and adversary.module is not None and adversary.layer == 0
    assert all(p.requires_grad and p.grad is None for p in lora)  # the model's weights got no gradient
    assert adversary.use_now()
    # trained on the harmful responses: their cross-entropy under the attacked model fell
    batch = collate(harmful_examples, tokenizer.pad_token_id)
    with torch.no_grad():
        clean = response_cross_entropy(peft, batch.input_ids, batch.attention_mask, batch.response_mask).mean()
        with adversary.installed(peft):
            attacked = response_cross_entropy(peft, batch.input_ids, batch.attention_mask, batch.response_mask).mean()
    assert float(attacked) < float(clean)
    step = adversary.before_micro_batch(peft)  # micro-batch 4: one more iteration of the same module
    assert step["adversary_iterations"] == 1 and "adversary_layer" in step
    # the success gate closes while the recent losses are high
    adversary.config.module_success_loss = 0.0
    assert not adversary.use_now()


def test_early_stopping_at_the_loss_threshold(harmful_examples, tiny_tokenizer):
    model, tokenizer = build_tiny_llama(seed=0)
    adversary = _adversary(model, tokenizer, harmful_examples, module_refresh_micro_batches=1, module_iterations=6,
                           module_stop_window=2, module_stop_loss=1e9)
    values = adversary.before_micro_batch(model)
    assert values["adversary_iterations"] == 2  # the mean of the first 2 losses is already below 1e9


def test_state_round_trip(harmful_examples, tiny_tokenizer):
    model, tokenizer = build_tiny_llama(seed=0)
    adversary = _adversary(model, tokenizer, harmful_examples, module_refresh_micro_batches=1, module_iterations=2)
    adversary.before_micro_batch(model)
    other = _adversary(model, tokenizer, harmful_examples, module_refresh_micro_batches=1, module_iterations=2)
    other.load_state_dict(adversary.state_dict())
    assert other.layer == adversary.layer and other.losses == adversary.losses
    assert other.micro_batches == adversary.micro_batches
    for a, b in zip(adversary.module.parameters(), other.module.parameters()):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def pools_dir(make_toy_pools) -> Path:
    return make_toy_pools(8, 8, 2)


def _config(pools: Path, **overrides):
    sets = [f'data.pools="{pools}"', "optim.max_steps=4", "run.checkpoint_every=2", "optim.grad_accumulation=2",
            "refinement.enabled=true", 'refinement.kind="module"', "refinement.module_refresh_micro_batches=3",
            "refinement.module_iterations=3", "refinement.module_probability=0.6", "refinement.module_success_loss=100"]
    sets += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_train_config(REPO / "configs" / "tiny.toml", sets)


def _run(config, out: Path, *, resume=False, max_steps=None) -> None:
    model, tokenizer = build_tiny_llama(seed=0)
    Trainer(config, out, resume=resume, model=model, tokenizer=tokenizer).train(max_steps=max_steps)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds_")} for r in rows]


@pytest.mark.parametrize("combine", ["replace", "join"])
def test_module_adversary_trains_and_resumes_exactly(tmp_path, pools_dir, combine):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = _config(pools_dir, **{"refinement.module_combine": combine})
        _run(config, tmp_path / "straight")
        _run(config, tmp_path / "split", max_steps=2)
        assert (tmp_path / "split" / "checkpoints" / "step-000002" / "refinement.safetensors").is_file()
        _run(config, tmp_path / "split", resume=True)
    finally:
        torch.set_num_threads(threads)
    straight, split = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert straight == split
    used = [m["adversary_used"] for m in straight]
    assert 0.0 in used and any(u > 0 for u in used)  # the gate opened on some micro-batches, not all
    attacked = [m for m in straight if m["adversary_used"] > 0]
    assert all("adversary_attacked_d_neg" in m and "adversary_clean_d_neg" in m for m in attacked)


def test_config_keys(tmp_path):
    from crl.config import ConfigError

    with pytest.raises(ConfigError, match="refinement.target: this key is now refinement.kind"):
        load_train_config(REPO / "configs" / "tiny.toml", ["refinement.target=\"residual\""])
    with pytest.raises(ConfigError, match="module_probability: expected a number in"):
        load_train_config(REPO / "configs" / "tiny.toml", ['refinement.kind="module"', "refinement.module_probability=2"])
    with pytest.raises(ConfigError, match="refinement.enabled: expected false unless mining.enabled"):
        load_train_config(REPO / "configs" / "tiny.toml", ["refinement.enabled=true"])
    # the module needs no mining
    config = load_train_config(REPO / "configs" / "tiny.toml", ["refinement.enabled=true", 'refinement.kind="module"'])
    assert config.refinement.kind == "module" and not config.mining.enabled
