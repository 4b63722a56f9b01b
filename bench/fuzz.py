"""The fuzz harness in full: >= 100,000 generated inputs per target, figures into bench/results/fuzz.json.

    nice -n 10 python bench/fuzz.py                      # 100,000 inputs per target (every target)
    python bench/fuzz.py --per-kind 5000 --out /tmp/f.json   # a quick look
    python bench/fuzz.py --targets wire_struct,dht_validator

The targets and their three input streams (valid / invalid by construction / anything) are in
tests/fuzz_targets.py, shared with the CI form (tests/test_fuzz.py). Per target the inputs are split
10% valid, 45% invalid, 45% anything. Recorded per target and stream: inputs run, accepted, refused,
exceptions escaping (goal 0, with the first few exception types), invalid inputs accepted (goal 0: an
invalid-stream input accepted, or any accepted input that breaks the target's invariant), valid inputs
refused (goal 0), and inputs per second (of hypothesis generating them plus the parser: the parser alone is
faster). Hypothesis runs in its generate phase only (no shrinking: nothing to shrink when nothing fails),
seeded, so a run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from fuzz_targets import ACCEPTED, ESCAPED, REFUSED, TARGETS, outcome  # noqa: E402

SHARE = {"valid": 0.10, "invalid": 0.45, "any": 0.45}


def run_stream(target, stream: str, n: int, rng_seed: int) -> dict:
    counts: Counter[str] = Counter()
    escaped: Counter[str] = Counter()
    examples: list[str] = []

    @seed(rng_seed)
    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(getattr(target, stream))
    def one(x):
        result, out = outcome(target, x)
        counts["inputs"] += 1
        counts[result] += 1
        if result == ESCAPED:
            escaped[type(out).__name__] += 1
            if len(examples) < 5:
                examples.append(f"{type(out).__name__}: {out}"[:300])
        if result == ACCEPTED and (stream == "invalid" or not target.invariant(out)):
            counts["invalid_accepted"] += 1
            if len(examples) < 5:
                examples.append(f"accepted: {out!r}"[:300])
        if stream == "valid" and result == REFUSED:
            counts["valid_refused"] += 1

    t0 = time.perf_counter()
    one()
    seconds = time.perf_counter() - t0
    return {"inputs": counts["inputs"], "accepted": counts[ACCEPTED], "refused": counts[REFUSED],
            "exceptions_escaping": counts[ESCAPED], "invalid_accepted": counts["invalid_accepted"],
            "valid_refused": counts["valid_refused"], "escaped_types": dict(escaped), "examples": examples,
            "seconds": round(seconds, 1), "inputs_per_s": round(counts["inputs"] / seconds) if seconds else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=100_000, help="inputs per target (all streams)")
    ap.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    ap.add_argument("--seed", type=int, default=20251009)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    args = ap.parse_args()
    chosen = [t for t in TARGETS if not args.targets or t.name in args.targets.split(",")]
    t_all = time.perf_counter()
    results = {}
    for i, t in enumerate(chosen):
        row = {"what": t.what, "streams": {}}
        for stream, share in SHARE.items():
            row["streams"][stream] = run_stream(t, stream, max(1, round(args.per_kind * share)), args.seed + i)
        s = row["streams"].values()
        row.update({k: sum(x[k] for x in s) for k in ("inputs", "exceptions_escaping", "invalid_accepted", "valid_refused")})
        row["seconds"] = round(sum(x["seconds"] for x in s), 1)
        row["inputs_per_s"] = round(row["inputs"] / row["seconds"]) if row["seconds"] else None
        results[t.name] = row
        print(f"{t.name:20s} {row['inputs']:7d} inputs  escaped {row['exceptions_escaping']}  invalid accepted "
              f"{row['invalid_accepted']}  valid refused {row['valid_refused']}  {row['inputs_per_s']}/s "
              f"({row['seconds']:.0f} s)", flush=True)
    total = {k: sum(r[k] for r in results.values()) for k in ("inputs", "exceptions_escaping", "invalid_accepted",
                                                              "valid_refused")}
    total["seconds"] = round(time.perf_counter() - t_all, 1)
    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
           "per_kind": args.per_kind, "split": SHARE, "seed": args.seed, "total": total, "targets": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"total: {total['inputs']} inputs in {total['seconds']:.0f} s; exceptions escaping "
          f"{total['exceptions_escaping']}, invalid accepted {total['invalid_accepted']}, valid refused "
          f"{total['valid_refused']} -> {args.out}")


if __name__ == "__main__":
    main()
