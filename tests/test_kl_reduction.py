"""`loss.kl_reduction`: crl's per-token mean and the reference code's `batchmean` (the KL summed over
tokens and vocabulary, divided by the number of retain sequences), by hand, in the step and under two
processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from crl.config import ConfigError
from crl.losses.objectives import retain_kl
from crl.training.config import load_train_config

REPO = Path(__file__).resolve().parent.parent


def _kl_by_hand(p_logits: list[float], q_logits: list[float], t: float) -> float:
    """KL(softmax(p / t) || softmax(q / t)) for one token, in plain Python."""
    def softmax(z):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax(p_logits), softmax(q_logits)
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_batchmean_by_hand() -> None:
    """Two sequences, three and one attended tokens, a vocabulary of three: batchmean is T^2 times the
    sum of the four per-token KLs divided by 2; token_mean divides by 4."""
    t = 2.0
    frozen = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [3.0, 1.0, 0.0], [0.0, -2.0, 1.0]]
    trained = [[0.0, 1.0, -1.0], [0.5, 1.5, 0.0], [2.0, 2.0, 0.0], [1.0, -1.0, 1.0]]
    per_token = [_kl_by_hand(f, q, t) for f, q in zip(frozen, trained)]
    got = retain_kl(torch.tensor(frozen), torch.tensor(trained), t, reduction="batchmean", num_sequences=2)
    assert got.item() == pytest.approx(t * t * sum(per_token) / 2, rel=1e-6)
    mean = retain_kl(torch.tensor(frozen), torch.tensor(trained), t)
    assert mean.item() == pytest.approx(t * t * sum(per_token) / 4, rel=1e-6)
    assert retain_kl(torch.tensor(frozen), torch.tensor(trained), t, reduction="token_mean").item() == mean.item()


def test_batchmean_equals_the_reference_formula_on_padded_logits() -> None:
    """The reference computes `F.kl_div(log_softmax(z' * m / T), softmax(z * m / T), "batchmean") * T^2`
    on [B, T, V] logits multiplied by the attention mask m: padded positions hold zero logits in both
    models (uniform distributions, KL 0). crl takes the attended rows only and divides by B."""
    torch.manual_seed(0)
    b, seq, vocab, t = 3, 5, 11, 2.0
    frozen, trained = torch.randn(b, seq, vocab) * 3, torch.randn(b, seq, vocab) * 3
    mask = torch.ones(b, seq)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    m = mask.unsqueeze(-1)
    reference = F.kl_div(F.log_softmax(trained * m / t, dim=-1), F.softmax(frozen * m / t, dim=-1),
                         reduction="batchmean") * t**2
    rows = mask.bool()
    got = retain_kl(frozen[rows], trained[rows], t, reduction="batchmean", num_sequences=b)
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)
    assert got.item() == pytest.approx(retain_kl(frozen[rows], trained[rows], t).item() * int(rows.sum()) / b, rel=1e-5)


def test_batchmean_needs_the_sequence_count_and_a_known_reduction() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_sequences"):
        retain_kl(z, z, 2.0, reduction="batchmean")
    with pytest.raises(ValueError, match="token_mean, batchmean"):
        retain_kl(z, z, 2.0, reduction="sum")
    with pytest.raises(ConfigError, match="loss.kl_reduction"):
        load_train_config(REPO / "configs" / "tiny.toml", ['loss.kl_reduction="sum"'])


@pytest.fixture(scope="module")
def pools_dir(make_toy_pools) -> Path:
    # 11 retain sequences: with a global batch of 4, an epoch ends with a batch of 3, split 2 + 1
    # between two processes (each rank's share must divide by the global 3, not by its own count)
    return make_toy_pools(12, 11, 4)


def test_the_step_logs_the_batchmean_kl(tmp_path: Path, pools_dir: Path) -> None:
    """In a training step, batchmean = token_mean x (retain tokens / retain sequences)."""
    from crl.models import build_tiny_llama
    from crl.training.trainer import Trainer

    sets = [f'data.pools="{pools_dir}"', "optim.max_steps=1", "lora.dropout=0.0"]
    config = load_train_config(REPO / "configs" / "tiny.toml", sets + ['loss.kl_reduction="batchmean"'])
    model, tokenizer = build_tiny_llama(seed=0)
    trainer = Trainer(config, tmp_path / "run", model=model, tokenizer=tokenizer)
    with torch.no_grad():  # a non-zero adapter, so that the KL is not 0
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    batches = trainer._next_batches()
    out = trainer.loss(batches, 0.0)
    tokens, sequences = int(batches.retain.attention_mask.sum()), int(batches.retain.input_ids.shape[0])
    trainer.config.loss.kl_reduction = "token_mean"
    mean = trainer.loss(batches, 0.0)
    assert out.metrics["loss_kl"] > 0
    assert out.metrics["loss_kl"] == pytest.approx(mean.metrics["loss_kl"] * tokens / sequences, rel=1e-4)


def test_batchmean_under_two_processes_equals_one_process(tmp_path: Path, pools_dir: Path) -> None:
    """Each rank's share is its KL sum over the global batch's sequence count (the trainer sets
    `Batch.global_size`); the trajectory equals the single-process one, including the uneven batch."""
    from test_distributed import assert_same_trajectory, metrics, run_one_process, run_two_processes

    extra = ['loss.kl_reduction="batchmean"']
    run_one_process(pools_dir, tmp_path / "one", extra)
    run_two_processes(pools_dir, tmp_path / "two", extra=extra)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert any(m["loss_kl"] > 0 for m in one)
    assert_same_trajectory(one, two)
