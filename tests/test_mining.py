"""Hard-negative mining: the cached bank, the indexes (native vs FAISS), the queue, the miner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crl.config import ConfigError
from crl.data import collate, encode_example, load_demo
from crl.mining import HardNegativeMiner, IndexParams, TrainedQueue, build_or_load_bank, exact_search, make_index
from crl.mining.bank import model_fingerprint, pooled_states
from crl.mining.index import bf16_bits, bf16_to_float32, resolve_backend
from crl.mining.miner import MiningStats
from crl.training.config import load_train_config
from crl.training.step import token_selection

REPO = Path(__file__).resolve().parent.parent


# --- the bank ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harmful_encoded(tiny_tokenizer):
    examples = [ex.with_response(f"Sure, here is how: {ex.prompt[:30]}") for ex in load_demo("harmful", "train")[:7]]
    return [encode_example(tiny_tokenizer, ex, max_length=192) for ex in examples]


def _bank(model, tokenizer, encoded, root, layers, **kw):
    pad = tokenizer.pad_token_id
    selections = [token_selection(collate([e], pad), "response", 16)[0].tolist() for e in encoded]

    def make_batch(indices):
        batch = collate([encoded[i] for i in indices], pad)
        return batch.input_ids, batch.attention_mask, token_selection(batch, "response", 16)

    return build_or_load_bank(model, encoded, make_batch, selections, layers=layers, pooling="mean:response",
                              root=root, batch_size=3, **kw)


def test_bank_is_reused_when_its_key_is_unchanged_and_rebuilt_otherwise(tmp_path, tiny_model, harmful_encoded):
    model, tokenizer = tiny_model
    first = _bank(model, tokenizer, harmful_encoded, tmp_path, [2, 3])
    assert not first.reused and first.size == 7 and first.dim == 64
    assert first.vectors[0].dtype == np.int16 and isinstance(first.vectors[0], np.memmap)  # bf16 bits, mmapped
    assert sorted(first.ids.tolist()) == list(range(7))
    # the stored vectors are the pooled frozen states, rounded to bf16
    batch = collate(harmful_encoded, tokenizer.pad_token_id)
    pooled = pooled_states(model, batch.input_ids, batch.attention_mask, token_selection(batch, "response", 16), [2, 3])
    got = bf16_to_float32(np.asarray(first.vectors[1]))[np.argsort(first.ids)]
    np.testing.assert_allclose(got, pooled[1].numpy(), rtol=1e-2, atol=1e-2)

    again = _bank(model, tokenizer, harmful_encoded, tmp_path, [2, 3])
    assert again.reused and again.path == first.path
    other_layers = _bank(model, tokenizer, harmful_encoded, tmp_path, [1, 3])
    assert not other_layers.reused and other_layers.path != first.path
    other_data = _bank(model, tokenizer, harmful_encoded[:6], tmp_path, [2, 3])
    assert not other_data.reused and other_data.path != first.path
    fp16 = _bank(model, tokenizer, harmful_encoded, tmp_path, [2, 3], dtype="float16")
    assert not fp16.reused and fp16.vectors[0].dtype == np.float16
    # another model (other weights) gives another key
    from crl.models import build_tiny_llama

    other_model, _ = build_tiny_llama(seed=1)
    assert model_fingerprint(other_model) != model_fingerprint(model)
    assert not _bank(other_model, tokenizer, harmful_encoded, tmp_path, [2, 3]).reused
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_bank_size_is_bounded(tmp_path, tiny_model, harmful_encoded):
    model, tokenizer = tiny_model
    bank = _bank(model, tokenizer, harmful_encoded, tmp_path, [2], max_size=4)
    assert bank.size == 4 and len(set(bank.ids.tolist())) == 4


class _ThreadRank:
    """Stands in for DistributedContext's object collectives when the ranks are threads of this process."""

    def __init__(self, rank: int, world_size: int, slots: list, barrier) -> None:
        self.rank, self.world_size, self._slots, self._barrier = rank, world_size, slots, barrier

    def _exchange(self, obj):
        self._slots[self.rank] = obj
        self._barrier.wait()  # times out (BrokenBarrierError) when a rank stops taking part
        out = list(self._slots)
        self._barrier.wait()
        return out

    def broadcast_object(self, obj, src=0):
        return self._exchange(obj)[src]

    def gather_object(self, obj, dst=0):
        out = self._exchange(obj)
        return out if self.rank == dst else None


def _bank_on_ranks(world_size, model, tokenizer, encoded, root, layers):
    """`build_or_load_bank` on `world_size` thread ranks: (each rank's bank or exception, its passes)."""
    import threading

    slots, barrier = [None] * world_size, threading.Barrier(world_size, timeout=60)
    results, passes = [None] * world_size, [0] * world_size
    pad = tokenizer.pad_token_id
    selections = [token_selection(collate([e], pad), "response", 16)[0].tolist() for e in encoded]

    import copy

    models = [copy.deepcopy(model) for _ in range(world_size)]  # a pass swaps modules and adds hooks: one each

    def run(rank):
        def make_batch(indices):
            passes[rank] += 1
            batch = collate([encoded[i] for i in indices], pad)
            return batch.input_ids, batch.attention_mask, token_selection(batch, "response", 16)

        try:
            results[rank] = build_or_load_bank(
                models[rank], encoded, make_batch, selections, layers=layers, pooling="mean:response", root=root,
                batch_size=3, dist=_ThreadRank(rank, world_size, slots, barrier),
                model_hash=model_fingerprint(model) if rank == 0 else None,  # read on rank 0 only
            )
        except Exception as exc:  # noqa: BLE001
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return results, passes


@pytest.mark.parametrize("world_size", [2, 4])
def test_bank_built_in_lock_step_by_several_ranks(tmp_path, tiny_model, harmful_encoded, monkeypatch, world_size):
    """Multi-process build (as under FSDP): 3 batches over W ranks, every rank running as many passes
    (the ranks without a batch in the last round pad it), rank 0 writing: the single-process bank.
    A reused bank runs no pass on any rank; a failed write on rank 0 fails every rank (no hang)."""
    model, tokenizer = tiny_model
    ref = _bank(model, tokenizer, harmful_encoded, tmp_path / "one", [2, 3])
    banks, passes = _bank_on_ranks(world_size, model, tokenizer, harmful_encoded, tmp_path / "many", [2, 3])
    assert passes == [-(-3 // world_size)] * world_size
    for bank in banks:
        assert not bank.reused and bank.path.name == ref.path.name and bank.path.parent == tmp_path / "many"
        assert np.array_equal(bank.ids, ref.ids)
        for a, b in zip(bank.vectors, ref.vectors):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    banks, passes = _bank_on_ranks(world_size, model, tokenizer, harmful_encoded, tmp_path / "many", [2, 3])
    assert all(b.reused for b in banks) and passes == [0] * world_size

    from crl.mining import bank as bank_module

    def fail(self, rows, stored):
        raise OSError("disk full")

    monkeypatch.setattr(bank_module._BankFiles, "write", fail)
    errors, passes = _bank_on_ranks(world_size, model, tokenizer, harmful_encoded, tmp_path / "fail", [2, 3])
    assert all(isinstance(e, RuntimeError) and "disk full" in str(e) for e in errors), errors
    assert passes == [-(-3 // world_size)] * world_size and not list((tmp_path / "fail").iterdir())


# --- the indexes ------------------------------------------------------------------------------------


def _random_bank(layers=2, n=2000, d=96, q=12, seed=0):
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((layers, n, d)).astype(np.float32)
    queries = rng.standard_normal((layers, q, d)).astype(np.float32)
    groups = np.arange(n, dtype=np.int64) // 2  # two vectors per sample
    query_groups = rng.integers(0, n // 2, q).astype(np.int64)
    return bank, queries, groups, query_groups


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_faiss_flat_and_native_return_the_same_hardest_negatives(metric):
    bank, queries, groups, qg = _random_bank()
    params = IndexParams(metric=metric)
    ref_s, ref_i = exact_search(bank, queries, 5, metric, groups, qg)
    for backend in ("native_fp32", "faiss_flat"):
        s, i = make_index(backend, params).build(bank, groups).search(queries, 5, qg)
        np.testing.assert_array_equal(i, ref_i, err_msg=backend)
        np.testing.assert_allclose(s, ref_s, rtol=1e-4, atol=1e-4)
        assert not np.isin(groups[i], qg[None, :, None]).any() or (groups[i] != qg[None, :, None]).all()
    # bf16 bank searched in place: equal to the brute force over the same bf16 values
    bits = bf16_bits(bank)
    s, i = make_index("native", params).build(bits, groups, kind="bfloat16").search(queries, 5, qg)
    bq = bf16_to_float32(bf16_bits(queries))
    _, ref_bf = exact_search(bf16_to_float32(bits), bq, 5, metric, groups, qg)
    assert (i[..., 0] == ref_bf[..., 0]).mean() >= 0.95


def test_group_exclusion_and_padding():
    bank, queries, groups, _ = _random_bank(n=10, q=3)
    qg = np.array([0, 1, 2], dtype=np.int64)
    for backend in ("native_fp32", "faiss_flat", "faiss_hnsw"):
        s, i = make_index(backend, IndexParams()).build(bank, groups).search(queries, 12, qg)
        own = groups[np.maximum(i, 0)] == qg[None, :, None]
        assert not (own & (i >= 0)).any(), backend
        assert ((i >= 0).sum(-1) == 8).all(), backend  # 10 rows, 2 of them the query's own sample
        assert np.isneginf(s[i < 0]).all()


def test_ivf_recall_on_a_clustered_bank():
    rng = np.random.default_rng(1)
    layers, n, d, q, k, clusters = 1, 20000, 64, 64, 10, 100
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * 4
    assign = rng.integers(0, clusters, n)
    bank = (centres[assign] + rng.standard_normal((n, d)).astype(np.float32))[None]
    queries = (centres[rng.integers(0, clusters, q)] + rng.standard_normal((q, d)).astype(np.float32))[None]
    groups = np.arange(n, dtype=np.int64)
    qg = rng.integers(0, n, q).astype(np.int64)
    _, exact_ids = make_index("native_fp32", IndexParams()).build(bank, groups).search(queries, k, qg)
    index = make_index("faiss_ivf", IndexParams(nprobe=8, seed=0)).build(bank, groups)
    assert index.nlist > 8
    _, ivf_ids = index.search(queries, k, qg)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(exact_ids[0], ivf_ids[0])])
    assert recall >= 0.95, recall


def test_auto_backend_policy():
    params = IndexParams(auto_native_max_gib=1.0)
    assert resolve_backend("auto", 1 << 20, params) == "native"
    assert resolve_backend("auto", 2 << 30, params) == "faiss_ivf"
    assert resolve_backend("faiss_hnsw", 2 << 30, params) == "faiss_hnsw"
    with pytest.raises(ValueError, match="mining.backend"):
        resolve_backend("annoy", 0, params)


# --- queue and miner --------------------------------------------------------------------------------


def test_queue_is_a_bounded_fifo_and_round_trips():
    q = TrainedQueue([2, 3], capacity=5, dim=4)
    q.push(torch.ones(2, 3, 4), torch.tensor([0, 1, 2]))
    arrays, ids = q.arrays()
    assert arrays[0].shape == (3, 4) and ids.tolist() == [0, 1, 2]
    q.push(2 * torch.ones(2, 4, 4), torch.tensor([3, 4, 5, 6]))
    assert q.count == 5 and q.ids.tolist() == [5, 6, 2, 3, 4]
    restored = TrainedQueue([2, 3], capacity=5, dim=4)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored.vectors, q.vectors) and restored.ptr == q.ptr and restored.ids.tolist() == q.ids.tolist()
    with pytest.raises(ValueError):
        TrainedQueue([2], capacity=5, dim=4).load_state_dict(q.state_dict())


def test_miner_excludes_own_sample_and_tracks_changes(tmp_path, tiny_model, harmful_encoded):
    model, tokenizer = tiny_model
    bank = _bank(model, tokenizer, harmful_encoded, tmp_path, [2, 3])
    miner = HardNegativeMiner(bank, benign_layers=[2, 3], target_layers=[3], k=2, backend="native", queue_size=4)
    assert miner.queue.count == 4
    # a harmful query equal to its own bank vector must not get itself back
    own = torch.from_numpy(bf16_to_float32(np.asarray(bank.vectors[1][:3])))[None]  # [1, 3, d]
    ids = torch.from_numpy(bank.ids[:3].copy())
    stats = MiningStats()
    mined = miner.mine_harmful(own, ids, stats)
    assert mined.negatives.shape == (1, 3, 2, 64)
    assert not (mined.owners == ids.numpy()[None, :, None]).any()
    assert "mined_sim_harmful" in stats.values and "hardest_changed_harmful" not in stats.values
    stats2 = MiningStats()
    miner.mine_harmful(own, ids, stats2)
    assert stats2.values["hardest_changed_harmful"] == 0.0
    benign = miner.mine_benign(torch.randn(2, 2, 64), torch.tensor([0, 1]), stats2)
    assert benign.negatives.shape == (2, 2, 2, 64) and bool(benign.valid.all())
    state = miner.state_dict()
    miner.push(torch.randn(2, 3, 64), torch.tensor([0, 1, 2]))
    miner.load_state_dict(state)
    assert miner.queue.version == state["queue"]["version"]


def test_queue_with_offset_stores_centred_and_gathers_raw():
    offset = torch.tensor([[40.0, 0.0, 0.0, 0.0], [0.0, -8.0, 0.0, 0.0]])
    raw = torch.randn(2, 3, 4) + offset[:, None, :]
    q = TrainedQueue([2, 3], capacity=5, dim=4, offset=offset)
    q.push(raw, torch.tensor([0, 1, 2]))
    arrays, _ = q.arrays()
    stored = torch.from_numpy(np.stack(arrays)).view(torch.bfloat16).float()
    torch.testing.assert_close(stored, (raw - offset[:, None, :]).bfloat16().float())  # centred, as indexed
    got = q.gather(np.array([[2, 0], [1, 1]]))
    torch.testing.assert_close(got, torch.stack([raw[0, [2, 0]], raw[1, [1, 1]]]), atol=0.02, rtol=0.01)
    plain = TrainedQueue([2, 3], capacity=5, dim=4)  # a checkpoint written without the offset
    plain.push(raw, torch.tensor([0, 1, 2]))
    restored = TrainedQueue([2, 3], capacity=5, dim=4, offset=offset)
    restored.load_state_dict(plain.state_dict())
    torch.testing.assert_close(restored.gather(np.array([[0], [2]])), plain.gather(np.array([[0], [2]])), atol=0.3, rtol=0.01)


@pytest.mark.parametrize("backend", ["native", "faiss_flat"])
def test_miner_ranks_centred_vectors_like_brute_force(tmp_path, backend):
    """A shared large component (as in real chat models) makes raw cosines near 1 for every pair; the
    miner ranks by cosine after removing the bank's mean, exactly as brute force over centred vectors."""
    from crl.mining.bank import FrozenBank

    g = np.random.default_rng(0)
    n, d = 40, 16
    raw = g.normal(size=(n, d)).astype(np.float32)
    raw[:, 0] += 40.0  # the shared component
    raw[:, 1] += g.uniform(0, 20, size=n)  # and one that varies in scale: it steers raw cosines
    bank = FrozenBank(tmp_path, [3], [bf16_bits(raw)], np.arange(n, dtype=np.int64), "bfloat16", "k")
    stored = bf16_to_float32(bank.vectors[0])
    queries = torch.from_numpy(stored[:5] + 0.3 * g.normal(size=(5, d)).astype(np.float32))[None]
    ids = torch.arange(5)

    def brute(x: np.ndarray, q: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        sims = q @ x.T
        sims[np.arange(5), np.arange(5)] = -np.inf  # own sample excluded
        return np.argsort(-sims, axis=1)[:, :3]

    center = stored.astype(np.float64).mean(axis=0).astype(np.float32)
    want = brute(bf16_to_float32(bf16_bits(stored - center)), queries[0].numpy() - center)
    got = HardNegativeMiner(bank, benign_layers=[3], target_layers=[3], k=3, backend=backend, queue_size=4)
    mined = got.mine_harmful(queries, ids, MiningStats())
    assert mined.owners[0].tolist() == want.tolist()
    # the negatives handed to the loss are the raw bank vectors
    np.testing.assert_array_equal(mined.negatives[0].numpy(), stored[want])
    raw_miner = HardNegativeMiner(bank, benign_layers=[3], target_layers=[3], k=3, backend=backend, queue_size=4,
                                  center=False)
    raw_owners = raw_miner.mine_harmful(queries, ids, MiningStats()).owners[0]
    assert raw_owners.tolist() == brute(stored, queries[0].numpy()).tolist()
    assert raw_owners.tolist() != want.tolist()  # the shared component changes the ranking


def test_mining_config_validation(tmp_path):
    tiny = REPO / "configs" / "tiny.toml"
    cfg = load_train_config(tiny, [])
    assert not cfg.mining.enabled and not cfg.refinement.enabled  # off by default
    with pytest.raises(ConfigError, match="refinement.enabled"):
        load_train_config(tiny, ["refinement.enabled=true"])
    with pytest.raises(ConfigError, match="mining.enabled"):
        load_train_config(tiny, ["mining.enabled=true", 'loss.method="repbend"'])
    with pytest.raises(ConfigError, match="mining.backend"):
        load_train_config(tiny, ['mining.backend="annoy"'])
    with pytest.raises(ConfigError, match="refinement.layers: expected"):
        load_train_config(tiny, ["refinement.layers=[3, 1]"])
    with pytest.raises(ConfigError, match="refinement.persistence: expected one of 'universal', 'per_sample'"):
        load_train_config(tiny, ['refinement.persistence="per_batch"'])


def test_mining_step_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benches" / "mining_step.py"), "--quick", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    backends = {r["backend"] for r in data["mining"] if r.get("seconds") is not None}
    assert {"native_fp32", "native_bf16", "faiss_flat"} <= backends
    assert "step" in data and data["step"]


# --- the loss with mined negatives --------------------------------------------------------------------


@pytest.mark.parametrize("combine", ["add", "replace"])
def test_mined_terms_in_the_loss(tmp_path, tiny_model, harmful_encoded, tiny_tokenizer, monkeypatch, combine):
    import crl.kernels
    from crl.models import apply_lora
    from crl.training.config import LossConfig, MiningConfig
    from crl.mining.stage import MiningStage
    from crl.training.step import LossComputer, StepBatches

    model, tokenizer = tiny_model
    bank = _bank(model, tokenizer, harmful_encoded, tmp_path, [2, 3])
    miner = HardNegativeMiner(bank, benign_layers=[2, 3], target_layers=[3], k=3, backend="native", queue_size=5)
    peft = apply_lora(model, r=4, alpha=8, dropout=0.0, layers=[0, 1, 2])
    benign = [encode_example(tokenizer, ex.with_response("Happy to help with that."), max_length=192)
              for ex in load_demo("benign", "train")[:2]]
    contrast = collate(benign + harmful_encoded[:3], tokenizer.pad_token_id)
    batches = StepBatches(contrast=contrast, num_benign=2, retain=None, selection=token_selection(contrast, "response", 16),
                          benign_ids=torch.tensor([0, 1]), harmful_ids=torch.tensor([0, 1, 2]))
    loss_cfg = LossConfig(target_layers=[3], benign_layers=[2, 3])
    mining = MiningConfig(enabled=True, k=3, combine=combine, weight=0.5)
    calls = []
    real = crl.kernels.triplet_loss

    def spy(anchors, positives, negatives, **kw):
        calls.append((tuple(anchors.shape), tuple(negatives.shape), kw.get("negative_index")))
        return real(anchors, positives, negatives, **kw)

    monkeypatch.setattr(crl.kernels, "triplet_loss", spy)
    stage = MiningStage(miner, layers=loss_cfg.captured_layers, benign_layers=[2, 3], target_layers=[3])
    out = LossComputer(peft, loss_cfg, mining=stage, mining_config=mining)(batches, 0.0)
    m = out.metrics
    # the mined negatives reach the kernel per sample: [L * S, k, d] with a row -> entry index
    mined_calls = [c for c in calls if len(c[1]) == 3 and c[1][1] == 3]
    assert sorted(c[1] for c in mined_calls) == [(1 * 3, 3, 64), (2 * 2, 3, 64)]
    for anchors, negatives, index in mined_calls:
        assert index is not None and index.shape == (anchors[0],) and int(index.max()) < negatives[0]
    assert {"loss_benign_mined", "loss_harmful_mined", "mined_sim_benign", "mined_sim_harmful", "seconds_mining"} <= set(m)
    if combine == "add":
        expected = 0.5 * (m["loss_benign"] + 0.5 * m["loss_benign_mined"]) + 0.6 * (m["loss_harmful"] + 0.5 * m["loss_harmful_mined"])
    else:
        assert "loss_benign" not in m and "loss_harmful" not in m
        expected = 0.5 * m["loss_benign_mined"] + 0.6 * m["loss_harmful_mined"]
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft.named_parameters() if "lora_" in n)
    assert miner.queue.version == 2  # refreshed with the batch's trained harmful states
