"""Multi-process training on the CPU (two processes, gloo) equals one process with the same global batch.

The two ranks are started as plain subprocesses with the torchrun-style environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that `accelerate launch` also sets; this file is
their entry point (`python tests/test_distributed.py worker ...`). For FSDP they also get the
variables `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets (FSDP_ENV).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
# What `accelerate launch --config_file configs/accelerate/fsdp2.yaml` puts in every process's environment
# (the parts crl reads; accelerate itself treats FSDP on the CPU as plain multi-CPU).
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "false",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}
KEYS = ("loss", "loss_benign", "loss_harmful", "loss_kl", "active_benign", "active_harmful",
        "benign_d_pos", "benign_d_neg", "harmful_d_pos", "harmful_d_neg", "grad_norm", "lr")


def _sets(pools: Path, extra: list[str]) -> list[str]:
    # Global micro-batch 4 per pool (2 per rank with two processes); dropout 0 so that the trajectories
    # can be compared exactly (with dropout each rank draws its own masks).
    return [f'data.pools="{pools}"', f"optim.max_steps={STEPS}", "run.checkpoint_every=2", "lora.dropout=0.0",
            "data.batch_size=4", "optim.lr=5e-3", *extra]


def _worker(pools: str, out: str, max_steps: int, resume: bool, extra: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from crl.models import build_tiny_llama
    from crl.training.config import load_train_config
    from crl.training.trainer import Trainer

    gathers = _count_all_gathers()
    count_syncs = os.environ.get("CRL_TEST_COUNT_SYNCS") == "1"  # host synchronisations (test_host_sync.py)
    patches = nullcontext()
    if count_syncs:
        from test_host_sync import count_training_syncs, on_train_device_patches

        patches = on_train_device_patches()
    with patches:
        config = load_train_config(REPO / "configs" / "tiny.toml", _sets(Path(pools), extra))
        model, tokenizer = build_tiny_llama(seed=0)
        trainer = Trainer(config, out, resume=resume, model=model, tokenizer=tokenizer)
        dist = trainer.dist
        assert dist is not None and dist.world_size == 2
        lora = [p for p in trainer.model.parameters() if p.requires_grad]
        same_at_start = dist.parameters_equal(lora)
        if count_syncs:
            counter = count_training_syncs(trainer, max_steps)
            syncs = {"syncs": counter.total, "sync_sites": [f"{n} x {kind} at {site}"
                                                            for (kind, site), n in counter.sites().most_common()]}
        else:
            trainer.train(max_steps=max_steps)
            syncs = {}
        same_at_end = dist.parameters_equal(lora)
    report = {"rank": dist.rank, "same_at_start": same_at_start, "same_at_end": same_at_end, "step": trainer.step,
              **syncs}
    if trainer.miner is not None:
        report["bank_reused"] = trainer.miner.bank.reused
    if trainer.refiner is not None:  # the universal perturbations, harmful and benign, identical on every rank
        refiner = trainer.refiner
        deltas = [p.delta.detach() for p in [*refiner.perturbations.values(), *refiner.benign_perturbations.values()]]
        report["perturbations_equal"] = dist.parameters_equal(deltas)
    if dist.fsdp is not None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        from crl.models import decoder_layers

        report["layers_sharded"] = all(isinstance(layer, FSDPModule) for layer in decoder_layers(trainer.model))
        report["frozen_held"] = dist.frozen_fraction_held(trainer.model)
        report["lora_whole"] = not any(isinstance(p, DTensor) for p in lora)
        report["all_gathers"] = gathers[0]  # FSDP's weight all-gathers: lock-step ranks issue as many
    Path(out, f"rank{dist.rank}.json").write_text(json.dumps(report))
    from crl.training.trainer import shutdown_distributed

    shutdown_distributed(synchronise=True)


def _count_all_gathers() -> list[int]:
    """Count the tensor all-gathers of this process (FSDP2 gathers weights with one of these)."""
    import torch.distributed as dist

    count = [0]
    for name in ("all_gather_single", "all_gather_into_tensor"):
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, **kwargs):
            count[0] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(pools: Path, out: Path, *, max_steps: int = STEPS, resume: bool = False,
                      extra: list[str] | None = None, timeout: float = 120.0,
                      env_extra: dict[str, str] | None = None) -> list[dict]:
    """Run the two ranks; returns their reports."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
        args = [sys.executable, __file__, "worker", str(pools), str(out), str(max_steps), str(int(resume)),
                json.dumps(extra or [])]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-4000:]}"
    reports = []
    for rank in range(2):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["same_at_start"] and report["same_at_end"], report
        reports.append(report)
    return reports


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_one_process(pools: Path, out: Path, extra: list[str] | None = None) -> None:
    import torch

    from crl.models import build_tiny_llama
    from crl.training.config import load_train_config
    from crl.training.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_train_config(REPO / "configs" / "tiny.toml", _sets(pools, extra or []))
        model, tokenizer = build_tiny_llama(seed=0)
        Trainer(config, out, model=model, tokenizer=tokenizer).train()
    finally:
        torch.set_num_threads(threads)


def assert_same_trajectory(one: list[dict], two: list[dict], keys=KEYS, rel: float = 1e-4) -> None:
    assert [m["step"] for m in one] == [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (a["step"], key, a[key], b[key])


@pytest.fixture(scope="module")
def pools_dir(make_toy_pools) -> Path:
    return make_toy_pools(12, 12, 4)


def test_two_processes_match_one_and_resume(tmp_path: Path, pools_dir: Path) -> None:
    """Loss trajectory of 2 ranks x 2 sequences = 1 process x 4 sequences; a 2-process run stopped at
    step 2 and resumed (by 2 processes) equals the straight one; only rank 0 writes; each rank reads
    the device once per optimizer step (the metrics, after their one all-gather)."""
    run_one_process(pools_dir, tmp_path / "one")
    reports = run_two_processes(pools_dir, tmp_path / "two", env_extra={"CRL_TEST_COUNT_SYNCS": "1"})
    for report in reports:  # one read per optimizer step, with the metrics' all-gather (test_host_sync.py)
        assert report["syncs"] == STEPS, report
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert_same_trajectory(one, two)
    assert two[-1]["loss_harmful"] != two[0]["loss_harmful"]  # it trained
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert (tmp_path / "two" / "adapter").is_dir()

    run_two_processes(pools_dir, tmp_path / "split", max_steps=2)
    assert [m["step"] for m in metrics(tmp_path / "split")] == [1, 2]
    run_two_processes(pools_dir, tmp_path / "split", resume=True)
    assert_same_trajectory(two, metrics(tmp_path / "split"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("benign_perturbation", ["shared", "refusal", "triplet"])
def test_two_processes_with_mining_and_refinement(tmp_path: Path, pools_dir: Path, benign_perturbation: str) -> None:
    """Mining (shared queue) and refinement (global hardest owners, with the benign-invariance term on
    each rank's benign rows; its refusal perturbation attacked on the global benign batch, its triplet
    one on each rank's share of the global objective, summed, with the bound and step size of the
    global batch) run under 2 processes, keep the same perturbations on both ranks and give the
    single-process losses and distances."""
    extra = ["mining.enabled=true", "mining.backend=\"native\"", f'mining.cache_dir="{tmp_path / "banks"}"',
             "refinement.enabled=true", "refinement.layers=[1,2]", "refinement.benign_invariance=0.5",
             f'refinement.benign_perturbation="{benign_perturbation}"']
    run_one_process(pools_dir, tmp_path / "one", extra)
    reports = run_two_processes(pools_dir, tmp_path / "two", extra=extra)
    assert all(r["perturbations_equal"] for r in reports), reports
    keys = KEYS + ("loss_benign_mined", "loss_harmful_mined", "mined_sim_benign", "mined_sim_harmful", "attack_loss",
                   "benign_attack_loss", "benign_attack_gap_start", "benign_attack_gap")
    perturbed = ("loss_benign_perturbed", "loss_benign_perturbed_mined", "benign_perturbed_d_pos",
                 "benign_perturbed_d_neg", "benign_perturbed_d_neg_mined")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert all("loss_benign_perturbed" in m for m in one)
    assert_same_trajectory(one, two, keys + perturbed)


@pytest.mark.slow
def test_two_processes_with_the_adversary_module(tmp_path: Path, pools_dir: Path) -> None:
    """The paper's adversary under 2 processes: every rank trains the same module (the mean loss
    decides the early stop, rank 0's weights are kept) and the loss equals the single-process one."""
    extra = ["refinement.enabled=true", 'refinement.kind="module"', "refinement.module_refresh_micro_batches=2",
             "refinement.module_iterations=3", "refinement.module_probability=0.7", "refinement.module_success_loss=100"]
    run_one_process(pools_dir, tmp_path / "one", extra)
    run_two_processes(pools_dir, tmp_path / "two", extra=extra)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    keys = KEYS + ("adversary_loss", "adversary_used", "adversary_attacked_d_neg")
    assert_same_trajectory(one, two, keys)
    assert any(m.get("adversary_used", 0) > 0 for m in two)


def run_accelerate_fsdp(pools: Path, out: Path, *, max_steps: int, timeout: float = 120.0,
                        extra: list[str] | None = None) -> str:
    """The user-facing route: `accelerate launch --config_file configs/accelerate/fsdp2.yaml -m crl train`
    with two processes (on a machine without GPUs accelerate runs them on the CPU with gloo and leaves
    FSDP to crl, which reads accelerate's environment). A hang (ranks waiting in different collectives)
    fails after `timeout` seconds: the launcher and its workers (its own process group) are killed."""
    sets = [a for s in _sets(pools, extra or []) for a in ("--set", s)]
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2",
            "--main_process_port", str(_free_port()), "-m", "crl", "train", str(REPO / "configs" / "tiny.toml"),
            *sets, "--output-dir", str(out), "--max-steps", str(max_steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        pytest.fail(f"accelerate launch did not finish within {timeout:.0f}s (a hang?):\n{output[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    return output


def test_fsdp_two_processes_match_one_and_resume(tmp_path: Path, pools_dir: Path) -> None:
    """FSDP2 (frozen weights sharded over 2 ranks, LoRA whole): a run launched by `accelerate launch`
    with configs/accelerate/fsdp2.yaml, stopped at step 2 and resumed to step 4, has the single-process
    loss trajectory of the same global batch; rank 0 wrote full LoRA checkpoints and a peft adapter
    equal to the single-process ones."""
    from safetensors.torch import load_file

    run_one_process(pools_dir, tmp_path / "one")
    out = tmp_path / "fsdp"
    log = run_accelerate_fsdp(pools_dir, out, max_steps=2)
    assert log.count("crl: FSDP2 over 2 processes: each holds 50.0% of the frozen weights") == 1, log[-4000:]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    reports = run_two_processes(pools_dir, out, resume=True, env_extra=FSDP_ENV)
    for report in reports:  # each rank holds half of the frozen weights, and the LoRA weights whole
        assert report["layers_sharded"] and report["lora_whole"], report
        assert report["frozen_held"] == pytest.approx(0.5, abs=0.01), report
    assert reports[0]["all_gathers"] == reports[1]["all_gathers"] > 0, reports
    one, two = metrics(tmp_path / "one"), metrics(out)
    assert_same_trajectory(one, two)
    assert two[-1]["loss_harmful"] != two[0]["loss_harmful"]  # it trained

    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    ref = load_file(str(tmp_path / "one" / "checkpoints" / "step-000004" / "adapter.safetensors"))
    got = load_file(str(out / "checkpoints" / "step-000004" / "adapter.safetensors"))
    assert sorted(got) == sorted(ref) and all(got[k].shape == ref[k].shape for k in ref)  # the full adapter
    ref_adapter = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(ref_adapter) and (out / "adapter" / "adapter_config.json").is_file()
    # Adam turns the ~1e-6 differences of summed gradients into ~1e-5 relative differences of the
    # weights (the same as plain data parallelism); a real error would be orders of magnitude larger.
    for a, b in ((got, ref), (adapter, ref_adapter)):
        for key in b:
            assert float((a[key] - b[key]).norm()) <= 1e-3 * float(b[key].norm()) + 1e-7, key


# Mining and refinement for the FSDP test. Refinement's draws (seed 0, probability 0.885): no attack at
# steps 1 and 4, an attack with a refresh of the perturbation at steps 2 and 3 (across the resume).
MINING_REFINEMENT = ["mining.enabled=true", 'mining.backend="native"', "mining.bank_batch_size=5",
                     "refinement.enabled=true", "refinement.layers=[1,2]", "refinement.probability=0.885"]
MINED_KEYS = ("loss_benign_mined", "loss_harmful_mined", "active_benign_mined", "active_harmful_mined",
              "mined_sim_benign", "mined_sim_harmful", "attack_loss_start", "attack_loss", "attack_samples")


def test_fsdp_mining_and_refinement_match_one_and_resume(tmp_path: Path, pools_dir: Path) -> None:
    """FSDP2 with mining and refinement: the frozen bank is built through the sharded model by both
    ranks in lock-step (3 batches of 5 over 2 ranks: rank 1 pads the second round) and equals the
    single-process bank; the run (launched by `accelerate launch`, stopped at step 2, resumed by two
    ranks that reuse the bank) has the single-process losses, mined terms and attack losses."""
    import numpy as np

    run_one_process(pools_dir, tmp_path / "one", [*MINING_REFINEMENT, f'mining.cache_dir="{tmp_path / "banks-one"}"'])
    extra = [*MINING_REFINEMENT, f'mining.cache_dir="{tmp_path / "banks-fsdp"}"']
    out = tmp_path / "fsdp"
    log = run_accelerate_fsdp(pools_dir, out, max_steps=2, extra=extra)
    assert "crl: FSDP2 over 2 processes" in log, log[-4000:]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    reports = run_two_processes(pools_dir, out, resume=True, env_extra=FSDP_ENV, extra=extra)
    assert all(r["bank_reused"] and r["layers_sharded"] and r["lora_whole"] for r in reports), reports
    assert reports[0]["all_gathers"] == reports[1]["all_gathers"] > 0, reports

    one, two = metrics(tmp_path / "one"), metrics(out)
    assert [("attack_loss" in m) for m in one] == [False, True, True, False]  # the schedule the comment says
    assert [("attack_loss" in m) for m in two] == [False, True, True, False]
    assert_same_trajectory(one, two, KEYS + MINED_KEYS)
    # The bank built by the two ranks is the single-process one (same key: the whole model's fingerprint).
    banks = [sorted(p for p in (tmp_path / name).iterdir()) for name in ("banks-one", "banks-fsdp")]
    assert [[p.name for p in b] for b in banks[1:]] == [[p.name for p in banks[0]]] and len(banks[0]) == 1, banks
    for ref in sorted(banks[0][0].glob("*.npy")):
        assert np.array_equal(np.load(ref), np.load(banks[1][0] / ref.name)), ref.name


def test_fsdp_settings_from_environment() -> None:
    from crl.config import ConfigError
    from crl.training.distributed import FsdpSettings

    assert FsdpSettings.from_environment({}) is None
    assert FsdpSettings.from_environment(FSDP_ENV) == FsdpSettings(reshard_after_forward=True)
    assert not FsdpSettings.from_environment({**FSDP_ENV, "FSDP_RESHARD_AFTER_FORWARD": "false"}).reshard_after_forward
    with pytest.raises(ConfigError, match="fsdp_version = 1"):
        FsdpSettings.from_environment({**FSDP_ENV, "FSDP_VERSION": "1"})
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        FsdpSettings.from_environment({**FSDP_ENV, "FSDP_OFFLOAD_PARAMS": "true"})
    with pytest.raises(ConfigError, match="fsdp_cpu_ram_efficient_loading"):
        FsdpSettings.from_environment({**FSDP_ENV, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"})
    with pytest.raises(ConfigError, match="fsdp_reshard_after_forward"):
        FsdpSettings.from_environment({**FSDP_ENV, "FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD"})


def test_batch_size_must_divide(tmp_path: Path) -> None:
    from crl.config import ConfigError
    from crl.training.distributed import DistributedContext

    ctx = DistributedContext(1, 3, "cpu")
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        ctx.check_batch_size(4)
    assert ctx.shard(list(range(6))) == [2, 3]
    assert [DistributedContext(r, 3, "cpu").shard(list(range(4))) for r in range(3)] == [[0, 1], [2], [3]]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _pools, _out, _steps, _resume, _extra = sys.argv[2:7]
    _worker(_pools, _out, int(_steps), bool(int(_resume)), json.loads(_extra))
