"""Write p2pswarm/data/datasets/arith.jsonl: the small question/answer file that ships for `--game text`.

Deterministic (a fixed seed and no other input): rerunning it gives the same bytes, hence the same dataset
hash, so peers with either copy exchange tasks. Questions are shaped like the `easy` preset's arithmetic,
which the embedded policy was warm-started on, so it earns rewards from the start; a tenth are fractions
("5/6"), which the `math` and `numeric` verifiers read and `exact` does only when written the same way.

    python scripts/make_arith_dataset.py            # rewrite the shipped file
    python scripts/make_arith_dataset.py --check    # exit 1 when the shipped file differs
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from fractions import Fraction
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "p2pswarm" / "data" / "datasets" / "arith.jsonl"
ROWS = 400
SEED = 2024


def row(rng: random.Random) -> dict[str, str]:
    kind = rng.random()
    if kind < 0.1:
        a = b = Fraction(1)
        while a.denominator == 1 or b.denominator == 1 or (a + b).denominator == 1:
            a, b = Fraction(rng.randint(1, 5), rng.randint(2, 6)), Fraction(rng.randint(1, 5), rng.randint(2, 6))
        return {"question": f"Calculate {a} + {b}. Give a fraction.", "answer": str(a + b)}
    if kind < 0.55:
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-")
        return {"question": f"Calculate {a} {op} {b}.", "answer": str(a + b if op == "+" else a - b)}
    terms = [rng.randint(0, 9) for _ in range(rng.randint(2, 3))]
    return {"question": "State the final answer to the following arithmetic problem: "
                        + " + ".join(map(str, terms)) + " =", "answer": str(sum(terms))}


def render() -> str:
    rng = random.Random(SEED)
    seen, lines = set(), []
    while len(lines) < ROWS:
        r = row(rng)
        if r["question"] not in seen:  # one row per question: a held-out question is never a training one
            seen.add(r["question"])
            lines.append(json.dumps(r, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing")
    text = render()
    if ap.parse_args().check:
        same = OUT.is_file() and OUT.read_text() == text
        print(f"{OUT}: {'up to date' if same else 'differs: rerun scripts/make_arith_dataset.py'}")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {ROWS} rows to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
