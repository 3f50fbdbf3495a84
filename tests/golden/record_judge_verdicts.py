"""Records the judges' verdicts on every labelled set crl has (tests/golden/judge_verdicts.json).

Run it only when a change of the judge's behaviour is intended, and say so in the commit; the test
tests/test_golden.py::test_judge_verdicts_unchanged compares against this file.

    python tests/golden/record_judge_verdicts.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: combined: the default judge (with the learned heads); combined_rules: the default before them; combined_no_semantic: the rules.
JUDGES = ("combined", "combined_rules", "combined_no_semantic")


def verdicts(judge_name: str, xstest_dir: Path | None) -> dict[str, list[str]]:
    from crl.evaluation.judge_agreement import XSTEST_SETS, load_labelled, load_labelled_generations, make_judge

    out: dict[str, list[str]] = {}
    if xstest_dir is not None:
        judge = make_judge(judge_name)
        for name, file in XSTEST_SETS.items():
            rows = load_labelled(xstest_dir / file)
            out[f"xstest/{name}"] = [j.verdict for j in judge.judge([r["prompt"] for r in rows], [r["completion"] for r in rows])]
    for path in sorted((REPO / "data" / "judge_labels").glob("*.jsonl")):
        rows = load_labelled_generations(path)
        recorded = {(r["prompt"], r["completion"]): r["base_perplexity"] for r in rows}
        judge = make_judge(judge_name, lambda ps, cs: [recorded[(p, c)] for p, c in zip(ps, cs)])
        out[f"judge_labels/{path.name}"] = [j.verdict for j in judge.judge([r["prompt"] for r in rows], [r["completion"] for r in rows])]
    return out


def main() -> int:
    xstest = REPO.parent / "shared" / "data" / "xstest"
    if not xstest.is_dir():
        print(f"{xstest} is absent: the XSTest sets cannot be recorded", file=sys.stderr)
        return 2
    golden = {name: verdicts(name, xstest) for name in JUDGES}
    (HERE / "judge_verdicts.json").write_text(json.dumps(golden, indent=0) + "\n")
    print({name: {k: len(v) for k, v in sets.items()} for name, sets in golden.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
