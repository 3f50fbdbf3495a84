"""Records the tiny model's metrics.jsonl for each method at a fixed seed (tests/golden/metrics_*.json).

Run it only when a change of the training trajectory is intended, and say so in the commit;
tests/test_golden.py::test_training_metrics_unchanged compares against these files. Timings
(`seconds_*`) are left out; every other value must match bit for bit on the machine that recorded
them (the file names its CPU, torch and thread count; elsewhere the test allows float rounding).

    python tests/golden/record_training_metrics.py
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: name -> --set overrides of configs/tiny.toml
RUNS: dict[str, list[str]] = {
    "crl": ["optim.max_steps=3", "optim.grad_accumulation=2"],
    "circuit_breakers": ["optim.max_steps=3", 'loss.method="circuit_breakers"', "loss.circuit_breakers.coefficient=1.5"],
    "repbend": ["optim.max_steps=3", 'loss.method="repbend"', "loss.baseline_frame=true",
                "loss.repbend.harmful_dissimilarity_weight=0.3"],
    "crl_mining_refinement": [
        "optim.max_steps=3", "optim.grad_accumulation=2", "mining.enabled=true", "mining.k=2", "mining.queue_size=6",
        "refinement.enabled=true", "refinement.layers=[1, 2]", "refinement.steps=1", "refinement.probability=0.75",
        "loss.crl.benign_weight={start = 0.4, end = 0.8}",
    ],
    "crl_adversary_module": [
        "optim.max_steps=3", "optim.grad_accumulation=2", "refinement.enabled=true", 'refinement.kind="module"',
        "refinement.module_refresh_micro_batches=3", "refinement.module_iterations=4", "refinement.module_stop_window=2",
        "refinement.module_probability=0.75", "refinement.module_success_loss=100", "refinement.module_lr=0.01",
    ],
}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": 1}


def run(name: str, work: Path) -> list[dict]:
    """The run's metrics.jsonl without the timings."""
    import torch

    from crl.training.config import load_train_config
    from crl.training.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = RUNS[name] + [f'mining.cache_dir="{work / "banks"}"', "run.progress=false"]
        config = load_train_config(REPO / "configs" / "tiny.toml", overrides)
        Trainer(config, work / name).train()
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]


def main() -> int:
    names = sys.argv[1:] or list(RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows = run(name, Path(tmp))
            (HERE / f"metrics_{name}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
            print(name, len(rows), "steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
