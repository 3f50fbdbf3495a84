"""The generation side of `crl data build`: batched greedy generation under a budget, each batch's
records appended (and flushed) to ``generations.jsonl`` as soon as it is done, so that an interrupted
build resumes where it stopped."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crl.data.formats import Example, append_jsonl, read_jsonl_records

__all__ = ["GENERATIONS_FILE", "BuildStopped", "GenerationRun", "read_generation_records"]

GENERATIONS_FILE = "generations.jsonl"


class BuildStopped(RuntimeError):
    """Raised when ``build_pools(stop_after=N)`` stops after N new generations (rerun to resume)."""

    def __init__(self, generated: int, remaining: int) -> None:
        super().__init__(f"stopped after {generated} new generations, {remaining} left; rerun to resume")
        self.generated = generated
        self.remaining = remaining


def read_generation_records(gen_path: Path) -> list[dict[str, Any]]:
    """The records of ``generations.jsonl`` in order; a partial last line (a crash mid-write) is cut
    off the file so that appends start on a fresh line."""
    if not gen_path.is_file():
        return []
    records = read_jsonl_records(gen_path, tolerate_partial_last_line=True)
    raw = gen_path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        gen_path.write_bytes(raw[: raw.rfind(b"\n") + 1])
    return records


class GenerationRun:
    """One build's generation: greedy completions in batches of similar prompt lengths (longest first),
    at most `stop_after` new ones in all (then `BuildStopped`), one progress bar."""

    def __init__(self, model: Any, tokenizer: Any, gen_path: Path, *, max_new_tokens: int, batch_size: int,
                 progress: bool, stop_after: int | None) -> None:
        self.model, self.tokenizer, self.gen_path = model, tokenizer, gen_path
        self.max_new_tokens, self.batch_size, self.stop_after = max_new_tokens, batch_size, stop_after
        self.progress = progress
        self.generated = 0
        self.planned = 0
        self._bar: Any = None

    def plan(self, n: int) -> None:
        """Announce `n` more generations (the progress bar's total, and `BuildStopped.remaining`)."""
        self.planned += n
        if self.progress and n and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=0, desc="building pools", unit="gen")
        if self._bar is not None:
            self._bar.total = self.planned
            self._bar.refresh()

    def run(self, items: Sequence[Example], records: Callable[[list[Example], list[str]], list[dict[str, Any]]], *,
            messages: Callable[[Example], list[dict[str, str]]] = lambda ex: ex.prompt_messages,
            prefill: Callable[[Example], str] | None = None, system_prompt: str | None = None) -> None:
        """Generate a completion of each item (its `messages`, continued after its `prefill` when given);
        `records(chunk, texts)` turns each batch into the records appended to generations.jsonl."""
        from crl.generation import generate

        pending = sorted(items, key=lambda ex: (-len(ex.prompt), ex.id))  # similar lengths; slowest first
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            if self.stop_after is not None:
                room = self.stop_after - self.generated
                if room <= 0:
                    raise BuildStopped(self.generated, self.planned - self.generated)
                chunk = chunk[:room]
            kwargs: dict[str, Any] = {}
            if prefill is not None:
                kwargs["prefill"] = [prefill(ex) for ex in chunk]
            texts = generate(self.model, self.tokenizer, [messages(ex) for ex in chunk],
                             max_new_tokens=self.max_new_tokens, batch_size=len(chunk), system_prompt=system_prompt,
                             **kwargs)
            append_jsonl(self.gen_path, records(chunk, texts))
            self.generated += len(chunk)
            if self._bar is not None:
                self._bar.update(len(chunk))

    def check_done(self) -> None:
        """At the end: `BuildStopped` when the budget ran out with generations still to make."""
        if self.stop_after is not None and self.generated >= self.stop_after and self.generated < self.planned:
            raise BuildStopped(self.generated, self.planned - self.generated)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
