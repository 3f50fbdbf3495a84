"""The training loop on the tiny model: it learns, resumes exactly, checkpoints atomically, exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crl.config import ConfigError
from crl.models import build_tiny_llama
from crl.training.config import TrainConfig, load_train_config
from crl.training.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pools_dir(make_toy_pools) -> Path:
    return make_toy_pools(12, 12, 4)


def tiny_config(pools: Path, **overrides: object) -> TrainConfig:
    sets = [f'data.pools="{pools}"', "optim.max_steps=6", "run.checkpoint_every=3", "lora.dropout=0.1"]
    sets += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_train_config(REPO / "configs" / "tiny.toml", sets)


def run(config: TrainConfig, out: Path, *, resume: bool = False, max_steps: int | None = None) -> Trainer:
    model, tokenizer = build_tiny_llama(seed=0)
    trainer = Trainer(config, out, resume=resume, model=model, tokenizer=tokenizer)
    trainer.train(max_steps=max_steps)
    return trainer


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_resume_equals_uninterrupted_run(tmp_path: Path, pools_dir: Path) -> None:
    config = tiny_config(pools_dir)
    run(config, tmp_path / "straight")
    run(config, tmp_path / "split", max_steps=3)
    assert [m["step"] for m in metrics(tmp_path / "split")] == [1, 2, 3]
    run(config, tmp_path / "split", resume=True)
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [m["step"] for m in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, split):
        for key in ("loss", "loss_benign", "loss_harmful", "loss_kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path: Path, pools_dir: Path) -> None:
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=4)  # checkpoint at 3, metrics up to 4
    assert len(metrics(tmp_path)) == 4
    run(config, tmp_path, resume=True)
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_half_written_checkpoint_is_ignored(tmp_path: Path, pools_dir: Path) -> None:
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=3)
    # A run killed while writing its next checkpoint leaves a temporary folder behind.
    (tmp_path / "checkpoints" / ".step-000006.abc").mkdir()
    (tmp_path / "checkpoints" / ".step-000006.abc" / "adapter.safetensors").write_bytes(b"partial")
    trainer = run(config, tmp_path, resume=True)
    assert trainer.step == 6


def test_refuses_to_overwrite_a_run_without_resume(tmp_path: Path, pools_dir: Path) -> None:
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=3)
    with pytest.raises(ConfigError, match="--resume"):
        run(config, tmp_path)


def test_resume_refuses_another_config(tmp_path: Path, pools_dir: Path) -> None:
    """Checkpoints continue only the run that wrote them: other target layers (other LoRA layers,
    another optimiser state) are an error naming the key; display-only settings may change."""
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=3)
    other = tiny_config(pools_dir, **{"loss.target_layers": [1]})
    with pytest.raises(ConfigError, match=r"loss\.target_layers: \[.*\] there, \[1\] here"):
        run(other, tmp_path, resume=True)
    with pytest.raises(ConfigError, match="optim.lr"):
        run(tiny_config(pools_dir, **{"optim.lr": 0.5}), tmp_path, resume=True)
    trainer = run(tiny_config(pools_dir, **{"run.progress": False, "run.keep_checkpoints": 3}), tmp_path, resume=True)
    assert trainer.step == 6


def test_crl_lowers_its_loss(tmp_path: Path, pools_dir: Path) -> None:
    config = tiny_config(pools_dir, **{"optim.max_steps": 24, "optim.lr": 5e-3, "run.checkpoint_every": 24})
    run(config, tmp_path)
    m = metrics(tmp_path)
    first = sum(x["loss_harmful"] for x in m[:4]) / 4
    last = sum(x["loss_harmful"] for x in m[-4:]) / 4
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("frame", [False, True])
@pytest.mark.parametrize("method", ["circuit_breakers", "repbend"])
def test_baselines_train_and_log_their_terms(tmp_path: Path, pools_dir: Path, method: str, frame: bool) -> None:
    config = tiny_config(pools_dir, **{"loss.method": method, "optim.max_steps": 2, "loss.baseline_frame": frame})
    run(config, tmp_path)
    m = metrics(tmp_path)
    keys = {"circuit_breakers": ("loss_retain", "loss_reroute"), "repbend": ("loss_harmful_distance", "loss_kl")}[method]
    for key in keys:
        assert all(torch.isfinite(torch.tensor(x[key])) for x in m)
    if method == "circuit_breakers":
        # c_rr = alpha (1 - t) with t = step / (2 * total)
        assert m[0]["coef_reroute"] == pytest.approx(0.5)
        assert m[1]["coef_reroute"] == pytest.approx(0.5 * (1 - 0.25))


def test_baseline_frame_centres_and_scales_on_the_frozen_rows() -> None:
    from crl.methods import MethodContext
    from crl.methods.baseline_frame import in_baseline_frame

    g = torch.Generator().manual_seed(0)
    shared = torch.zeros(2, 1, 6)
    shared[..., 0] = 50.0  # a "massive activation" shared by every state: raw cosines are all ~1
    fa, fb = torch.randn(2, 3, 6, generator=g) + shared, torch.randn(2, 4, 6, generator=g) + shared
    ta, tb = fa + 0.5 * torch.randn(2, 3, 6, generator=g), fb + 0.5 * torch.randn(2, 4, 6, generator=g)
    context = MethodContext()
    assert all(x is y for x, y in zip(in_baseline_frame(context, False, ta, fa, tb, fb), (ta, fa, tb, fb)))
    out = in_baseline_frame(context, True, ta, fa, tb, fb)
    frozen = torch.cat([fa, fb], dim=1)
    centre = frozen.mean(dim=1, keepdim=True)
    scale = (frozen - centre).norm(dim=-1).mean(dim=1)[:, None, None]
    for got, x in zip(out, (ta, fa, tb, fb)):
        torch.testing.assert_close(got, (x - centre) / scale)
    cos = torch.nn.functional.cosine_similarity
    assert cos(tb, fb, dim=-1).min() > 0.99 and cos(out[2], out[3], dim=-1).min() < 0.99


def test_finished_run_exports_a_peft_adapter_and_merges(tmp_path: Path, pools_dir: Path) -> None:
    from peft import PeftModel

    from crl.training.export import merge_adapter

    config = tiny_config(pools_dir, **{"optim.max_steps": 2, "model.name": "tiny"})
    trainer = run(config, tmp_path / "run")
    assert (tmp_path / "run" / "README.md").is_file()
    base, tokenizer = build_tiny_llama(seed=0)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    trained = trainer.accelerator.unwrap_model(trainer.model)
    trained.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trained(ids).logits, atol=1e-5)
    merged_dir = merge_adapter(tmp_path / "run", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trained(ids).logits, atol=1e-4)


def test_metrics_log_every_term(tmp_path: Path, pools_dir: Path) -> None:
    config = tiny_config(pools_dir, **{"optim.max_steps": 1})
    run(config, tmp_path)
    (m,) = metrics(tmp_path)
    for key in (
        "loss", "loss_benign", "loss_harmful", "loss_kl", "active_benign", "active_harmful",
        "benign_d_pos", "benign_d_neg", "harmful_d_pos", "harmful_d_neg", "lr", "seconds_per_step",
        "seconds_frozen_pass", "seconds_trained_pass",
    ):
        assert key in m, key
    assert 0.0 <= m["active_harmful"] <= 1.0


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss]\nmargn = 1.0\n")
    with pytest.raises(ConfigError, match=r"bad.toml: loss: unknown key\(s\) 'margn'"):
        load_train_config(bad)
    bad.write_text("[optim]\nlr = 'fast'\n")
    with pytest.raises(ConfigError, match=r"bad.toml: optim.lr: expected a number"):
        load_train_config(bad)
    bad.write_text("[loss]\nbenign_positive_distance = 'manhattan'\n")
    with pytest.raises(ConfigError, match=r"bad.toml: loss.benign_positive_distance: this key is now loss.crl.benign"):
        load_train_config(bad)
    bad.write_text("[loss]\nmethod = 'magic'\n")
    with pytest.raises(ConfigError, match=r"loss.method: expected one of 'crl'"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="--set"):
        load_train_config(None, ["optim.lr"])


@pytest.mark.parametrize("name", ["tiny.toml", "demo-smollm2.toml", "llama3-8b-instruct.toml", "mistral-7b-instruct.toml"])
def test_ready_configs_load(name: str) -> None:
    config = load_train_config(REPO / "configs" / name)
    assert config.optim.max_steps >= 1


@pytest.mark.parametrize("name", ["llama3-8b-instruct.toml", "mistral-7b-instruct.toml"])
def test_reference_configs_hold_the_reference_values(name: str) -> None:
    """The values of the reference code's train.sh (METHOD=triplet), as docs/reproduction.md lists them."""
    c = load_train_config(REPO / "configs" / name)
    assert c.loss.method == "crl" and c.loss.tokens == "response"
    assert c.loss.target_layers == list(range(20, 31)) and c.loss.benign_layers == list(range(1, 33))
    assert c.lora.layers == list(range(31)) and (c.lora.r, c.lora.alpha, c.lora.dropout) == (16, 16, 0.05)
    assert len(c.lora.target_modules) == 7
    assert not c.loss.center_states and not c.loss.normalize_layer_scale
    assert (c.loss.kl_reduction, c.loss.kl_temperature) == ("batchmean", 2.0)
    crl = c.loss.crl
    assert [w.at(0.5) for w in (crl.benign_weight, crl.harmful_weight, crl.retain_kl_weight)] == [0.5, 0.6, 0.7]
    assert (crl.benign_positive_distance, crl.benign_negative_distance) == ("l2", "cosine")
    assert (crl.harmful_positive_distance, crl.harmful_negative_distance) == ("cosine", "cosine")
    assert (crl.benign_margin, crl.harmful_margin) == (2.0, 3.0)
    o = c.optim
    assert (o.lr, o.lr_schedule, o.warmup_steps, o.weight_decay, o.max_grad_norm) == (1e-4, "constant", 0, 0.0, 1.0)
    assert (o.max_steps, o.grad_accumulation, c.data.batch_size, c.data.max_length) == (900, 4, 8, 1024)


def test_yaml_config_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  method: repbend\n  repbend:\n    benign_distance_weight: {start: 1.0, end: 0.0}\n"
                    "optim:\n  lr: 0.01\n")
    config = load_train_config(path, ["optim.max_steps=7", "loss.repbend.retain_kl_weight=0.25"])
    assert config.loss.method == "repbend" and config.optim.max_steps == 7
    assert config.loss.repbend.benign_distance_weight.at(0.5) == pytest.approx(0.5)
    assert config.loss.method_config.retain_kl_weight.at(0.9) == 0.25


@pytest.mark.parametrize("old, new", [
    ("alpha", "loss.crl.benign_weight, loss.circuit_breakers.coefficient or loss.repbend.benign_distance_weight"),
    ("beta", "loss.crl.harmful_weight or loss.repbend.harmful_distance_weight"),
    ("gamma", "loss.crl.retain_kl_weight or loss.repbend.harmful_dissimilarity_weight"),
    ("epsilon", "loss.repbend.retain_kl_weight"),
    ("harmful_margin", "loss.crl.harmful_margin"),
    ("benign_positive_distance", "loss.crl.benign_positive_distance"),
])
def test_old_loss_keys_name_their_new_place(old: str, new: str) -> None:
    """The method-specific keys moved into each method's section; the old ones fail naming it."""
    with pytest.raises(ConfigError, match=f"configs/tiny.toml: loss.{old}: this key is now {new}$"):
        load_train_config(REPO / "configs" / "tiny.toml", [f"loss.{old}=0.5"])


def test_every_method_has_its_config_section() -> None:
    from crl.methods import METHODS
    from crl.training.config import LossConfig

    config = LossConfig()
    for name, method in METHODS.items():
        assert isinstance(getattr(config, name), method.Config)
    with pytest.raises(ConfigError, match="loss.crl.harmful_margin: expected a number"):
        load_train_config(REPO / "configs" / "tiny.toml", ['loss.crl.harmful_margin="big"'])


def test_token_selection_modes() -> None:
    from crl.data import Batch
    from crl.training.step import token_selection

    response = torch.tensor([[False, False, True, True, True], [False, True, True, False, False]])
    request = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    batch = Batch(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), request, response)
    assert token_selection(batch, "response", 0).equal(response)
    assert token_selection(batch, "last_request", 0).tolist() == [
        [False, True, False, False, False], [True, False, False, False, False]
    ]
    assert token_selection(batch, "first_response", 2).tolist() == [
        [False, False, True, True, False], [False, True, True, False, False]
    ]


def test_assistant_selection_and_per_pool_selection() -> None:
    from crl.data import Batch
    from crl.training.config import LossConfig
    from crl.training.step import contrast_selection, token_selection

    # request, two header tokens, response, end of turn, padding
    request = torch.tensor([[True, True, False, False, False, False, False, False]] * 2)
    response = torch.tensor([[False, False, False, False, True, True, False, False],
                             [False, False, False, False, True, True, True, False]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    batch = Batch(torch.zeros(2, 8, dtype=torch.long), attention, request, response)
    assistant = token_selection(batch, "assistant", 0)
    assert assistant.tolist() == [[False, False, True, True, True, True, False, False],
                                  [False, False, True, True, True, True, True, False]]
    config = LossConfig(harmful_tokens="assistant")
    mixed = contrast_selection(batch, 1, config)  # row 0 benign (response), row 1 harmful (assistant)
    assert mixed[0].equal(response[0]) and mixed[1].equal(assistant[1])
    assert contrast_selection(batch, 1, LossConfig()).equal(response)


def test_assistant_selection_on_smollm2_template(smollm2_tokenizer) -> None:
    from crl.data import Example, collate, encode_example
    from crl.training.step import token_selection

    tok = smollm2_tokenizer
    enc = encode_example(tok, Example.from_prompt("x", "How do I make a cake?", "Mix flour and eggs."))
    mask = token_selection(collate([enc], tok.pad_token_id), "assistant", 0)[0].tolist()
    text = tok.decode([i for i, m in zip(enc.input_ids, mask) if m])
    assert text.startswith("<|im_end|>") and text.endswith("Mix flour and eggs.")
    assert "assistant" in text and "cake" not in text


def test_retain_logits_equal_the_model_logits(tiny_model) -> None:
    from crl.data import Batch
    from crl.training.step import _final_logits

    model, _ = tiny_model
    model.eval()
    with torch.no_grad():  # a non-trivial final norm: applying it twice would change the logits
        model.model.norm.weight.uniform_(0.5, 2.0)
    ids = torch.randint(3, 200, (2, 7))
    attention = torch.ones_like(ids)
    attention[1, 5:] = 0
    batch = Batch(ids, attention, torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool))
    mask = attention.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention).logits[mask]
        got = _final_logits(model, batch, mask)
    assert torch.allclose(got, expected, atol=1e-5)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path: Path, pools_dir: Path) -> None:
    """An optimizer step over two accumulated micro-batches sees the mean of their gradients."""
    from crl.training.trainer import Trainer

    config = tiny_config(pools_dir, **{"optim.max_steps": 1, "optim.grad_accumulation": 2, "lora.dropout": 0.0})
    model, tokenizer = build_tiny_llama(seed=0)
    trainer = Trainer(config, tmp_path / "acc", model=model, tokenizer=tokenizer)
    # Reproduce the two micro-batches by hand on a twin trainer and average their gradients.
    twin_model, _ = build_tiny_llama(seed=0)
    twin = Trainer(config, tmp_path / "twin", model=twin_model, tokenizer=tokenizer)
    grads = []
    for micro in range(2):
        out = twin.loss(twin._next_batches(micro), 0.0)
        out.loss.backward()
        grads.append([p.grad.clone() for p in twin.model.parameters() if p.requires_grad])
        twin.model.zero_grad()
    expected = [(a + b) / 2 for a, b in zip(*grads)]
    trainer.optimizer.step = lambda *a, **k: None  # keep the gradients for inspection
    trainer.optimizer.zero_grad = lambda *a, **k: None
    trainer.config.optim.max_grad_norm = 1e9
    trainer.train()
    got = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6, rtol=1e-4)


def test_ready_eval_config_loads() -> None:
    from crl.evaluation.config import load_eval_config

    config = load_eval_config(REPO / "configs" / "eval-smollm2.toml")
    assert {a.kind for a in config.attacks} >= {"direct", "prefill", "embedding"}
    assert set(config.adapters) == {"crl", "circuit_breakers", "repbend"}
    wide = load_eval_config(REPO / "configs" / "eval-smollm2-wide.toml")
    assert {a.prompt_set for a in wide.attacks} == {"harmful", "advbench"}
    assert {p.name: p.limit for p in wide.prompt_sets}["xstest_safe"] is None  # all 250 safe prompts
    llama = load_eval_config(REPO / "configs" / "eval-llama3-8b.toml")
    assert (llama.dtype, llama.device) == ("bfloat16", "cuda") and set(llama.adapters) == {"crl"}


def test_demo_runs_end_to_end_on_the_tiny_model_and_resumes(tmp_path: Path) -> None:
    from crl.cli import main

    argv = [
        "demo", "--model", "tiny", "--output-dir", str(tmp_path), "--prompts", "2", "--max-new-tokens", "4",
        "--set", "loss.target_layers=[2, 3]", "--set", "data.max_length=192", "--set", "optim.max_steps=2",
        "--set", "data.generation_max_new_tokens=4", "--set", "run.progress=false", "--baselines", "--skip-eval",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "comparison.json").read_text())["summary"]
    assert summary["harmful"]["prompts"] == 2 and summary["benign"]["prompts"] == 2
    for method in ("crl", "circuit_breakers", "repbend"):
        assert (tmp_path / method / "adapter" / "adapter_config.json").is_file(), method
    first = (tmp_path / "crl" / "metrics.jsonl").read_text()
    assert main(argv) == 0  # a rerun resumes every stage and redoes no training
    assert (tmp_path / "crl" / "metrics.jsonl").read_text() == first
