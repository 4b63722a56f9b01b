"""The fuzz harness in full: >= 100,000 generated inputs per target, figures into bench/results/fuzz.json.

    nice -n 10 python bench/fuzz.py                          # 100,000 inputs per target, every target
    python bench/fuzz.py --per-kind 5000 --out /tmp/f.json   # a quick look
    python bench/fuzz.py --targets wire_struct,dht_validator

The targets and their three input streams (valid / invalid by construction / anything) are in
tests/fuzz_targets.py, shared with the CI form (tests/test_fuzz.py).

Hypothesis spends milliseconds per input on this machine, so a straight 100,000 per target would take hours.
The bench therefore draws *pools* with hypothesis and recombines them with a seeded RNG, keeping each
stream's meaning:
    valid     hypothesis draws (VALID_DRAWS of them)
    invalid   hypothesis draws (INVALID_DRAWS), then, to fill the stream's share:
              - recombined: a valid map from a pool of hypothesis-drawn bases with one field replaced by a
                hypothesis-drawn bad value for that field (or a required field removed), then encoded and
                signed (the target's `spec`): invalid by construction, like the hypothesis stream itself;
              - mutated: random byte changes (bit flips, cuts, insertions, splices...) of signed inputs whose
                one field is bad (`sealed`): a change to the signed content breaks the signature, no change
                keeps the bad field, so these stay invalid by construction too.
    any       hypothesis draws (ANY_DRAWS), then random mutations of any input drawn so far (bytes changed,
              or a leaf of a structure replaced by a hypothesis-drawn value or a known-nasty one).
Recorded per target and stream: inputs, accepted, refused, exceptions escaping (goal 0, with the first
few), invalid accepted (goal 0: an invalid-stream input accepted, or any accepted input that breaks the
target's invariant), valid refused (goal 0), seconds and inputs per second (generation included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hivemind.dht.validation import DHTRecord  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_targets import (ACCEPTED, ESCAPED, REFUSED, TARGETS, _jsonable, anything, json_anything,  # noqa: E402
                          outcome)

VALID_DRAWS, INVALID_DRAWS, ANY_DRAWS = 2000, 4000, 4000
BASES, BAD_VALUES, SEALED, LEAVES = 1000, 200, 2000, 1000  # pool sizes for recombining and mutating
INVALID_SHARE = 0.45  # of --per-kind; the rest after valid goes to `any`
NASTY = [math.nan, math.inf, -math.inf, 0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, -1e308, 0.5,
         True, False, None, "", "\x1b[2J", "\u202e", "a" * 300, b"", b"\x00" * 33, [], {}, [1], {"a": 1}, "12D3KooW"]


def draw(strategy: st.SearchStrategy, n: int, rng_seed: int) -> list:
    """n inputs drawn by hypothesis (its generate phase: no shrinking, nothing is asserted)."""
    out: list = []
    if n <= 0:
        return out

    @seed(rng_seed)
    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x):
        out.append(x)

    collect()
    return out


# ---- mutations --------------------------------------------------------------------------------------------
def mutate_bytes(b: bytes, rng: random.Random, others: list) -> bytes:
    b = bytearray(b)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(7)
        n = len(b)
        if op == 0 and n:  # flip 1-4 bits
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # cut short
            del b[rng.randrange(n):]
        elif op == 2:  # insert random bytes
            i = rng.randint(0, n)
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and n:  # delete a slice
            i = rng.randrange(n)
            del b[i:i + rng.randint(1, 16)]
        elif op == 4 and n:  # duplicate a slice
            i = rng.randrange(n)
            b[i:i] = b[i:i + rng.randint(1, 32)]
        elif op == 5 and n:  # an interesting byte
            b[rng.randrange(n)] = rng.choice((0x00, 0xFF, 0xC1, 0x7F, 0x80, 0xDD, 0xDF, 0xC6, 0xCB, 0x22, 0x5C))
        else:  # splice with another input's bytes
            o = rng.choice(others) if others else b""
            if isinstance(o, (bytes, bytearray)) and o:
                i, j = rng.randint(0, n), rng.randrange(len(o))
                b[i:] = o[j:]
    return bytes(b)


def mutate_obj(x, rng: random.Random, leaves: list, depth: int = 0):
    """x with one random part changed: bytes mutated, a leaf replaced, a key removed or added."""
    if isinstance(x, (bytes, bytearray)):
        return mutate_bytes(bytes(x), rng, [])
    if isinstance(x, DHTRecord):
        f = rng.choice(("key", "subkey", "value", "value", "expiration_time"))
        v = getattr(x, f)
        return dataclasses.replace(x, **{f: mutate_obj(v, rng, leaves, depth + 1) if rng.random() < 0.7
                                         else rng.choice(NASTY + leaves)})
    if isinstance(x, SimpleNamespace):
        d = dict(vars(x))
        if d and rng.random() < 0.8:
            k = rng.choice(sorted(d))
            d[k] = mutate_obj(d[k], rng, leaves, depth + 1)
        return SimpleNamespace(**d)
    if isinstance(x, dict) and depth < 6:
        d = dict(x)
        r = rng.random()
        if d and r < 0.6:
            k = rng.choice(list(d))
            d[k] = mutate_obj(d[k], rng, leaves, depth + 1)
        elif d and r < 0.8:
            del d[rng.choice(list(d))]
        else:
            d[rng.choice(["x", "round", "time", "name", "peer", "files", b"k", 7])] = rng.choice(NASTY + leaves)
        return d
    if isinstance(x, tuple):  # a target's argument tuple (owner, value, expiration): its arity stays
        items = list(x)
        i = rng.randrange(len(items)) if items else 0
        if items:
            items[i] = mutate_obj(items[i], rng, leaves, depth + 1)
        return tuple(items)
    if isinstance(x, list) and depth < 6:
        items = list(x)
        if items and rng.random() < 0.7:
            i = rng.randrange(len(items))
            items[i] = mutate_obj(items[i], rng, leaves, depth + 1)
        elif items and rng.random() < 0.5:
            del items[rng.randrange(len(items))]
        else:
            items.insert(rng.randint(0, len(items)), rng.choice(NASTY + leaves))
        return items
    if isinstance(x, float) and rng.random() < 0.5:
        return rng.choice((x + 1e-6, x * 1e6, -x, math.nextafter(x, math.inf), x + 3600))
    return rng.choice(NASTY + leaves)


# ---- running ----------------------------------------------------------------------------------------------
class Stream:
    def __init__(self, target, name: str):
        self.t, self.name = target, name
        self.c: Counter[str] = Counter()
        self.escaped: Counter[str] = Counter()
        self.examples: list[str] = []
        self.seconds = 0.0

    def run(self, x) -> None:
        result, out = outcome(self.t, x)
        self.c["inputs"] += 1
        self.c[result] += 1
        if result == ESCAPED:
            self.escaped[type(out).__name__] += 1
            self._note(f"{type(out).__name__}: {out}")
        if result == ACCEPTED and (self.name == "invalid" or not self.t.invariant(out)):
            self.c["invalid_accepted"] += 1
            self._note(f"accepted: {out!r} from {x!r}")
        if self.name == "valid" and result == REFUSED:
            self.c["valid_refused"] += 1
            self._note(f"refused a valid input: {x!r}")

    def _note(self, s: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(s[:400])

    def row(self, how: dict) -> dict:
        n = self.c["inputs"]
        return {"inputs": n, "accepted": self.c[ACCEPTED], "refused": self.c[REFUSED],
                "exceptions_escaping": self.c[ESCAPED], "invalid_accepted": self.c["invalid_accepted"],
                "valid_refused": self.c["valid_refused"], "escaped_types": dict(self.escaped), "examples": self.examples,
                "seconds": round(self.seconds, 1), "inputs_per_s": round(n / self.seconds) if self.seconds else None,
                "made_by": how}


def fuzz_target(t, per_kind: int, base_seed: int) -> dict:
    rng = random.Random(base_seed)
    streams = {k: Stream(t, k) for k in ("valid", "invalid", "any")}

    # valid: hypothesis draws
    s = streams["valid"]
    t0 = time.perf_counter()
    valid = draw(t.valid, VALID_DRAWS, base_seed)
    for x in valid:
        s.run(x)
    s.seconds = time.perf_counter() - t0
    s_how = {"hypothesis": len(valid)}

    # invalid: hypothesis draws, then recombined and mutated (both invalid by construction)
    s = streams["invalid"]
    t0 = time.perf_counter()
    invalid = draw(t.invalid, INVALID_DRAWS, base_seed + 1)
    for x in invalid:
        s.run(x)
    how = {"hypothesis": len(invalid), "recombined": 0, "mutated_sealed": 0}
    want = max(0, round(per_kind * INVALID_SHARE) - len(invalid))
    makers = []
    if t.spec is not None:
        sp = t.spec
        bases = draw(sp.base, BASES, base_seed + 2)
        bad = {k: [v for v in draw(strat, BAD_VALUES, base_seed + 3 + i) if not sp.json or _jsonable(v)]
               for i, (k, strat) in enumerate(sp.fields.items())}
        choices = [(k, vs) for k, vs in bad.items() if vs] + [(k, None) for k in sp.required]

        def recombined():
            m = dict(rng.choice(bases))
            k, vs = rng.choice(choices)
            if vs is None:
                if k not in m:
                    return None
                del m[k]
            else:
                m[k] = rng.choice(vs)
            return sp.encode(m)
        makers.append(("recombined", recombined))
    if t.sealed is not None:
        sealed = draw(t.sealed, SEALED, base_seed + 50)
        makers.append(("mutated_sealed", lambda: mutate_obj(rng.choice(sealed), rng, [])))
    made = 0
    while makers and made < want:
        kind, make = makers[made % len(makers)]
        x = make()
        if x is None:
            continue
        s.run(x)
        how[kind] += 1
        made += 1
    s.seconds = time.perf_counter() - t0
    i_how = how

    # any: hypothesis draws, then mutations of everything drawn so far
    s = streams["any"]
    t0 = time.perf_counter()
    anys = draw(t.any, ANY_DRAWS, base_seed + 100)
    for x in anys:
        s.run(x)
    leaves = draw(anything | json_anything, LEAVES, base_seed + 101)
    corpus = valid + invalid + anys
    want = max(0, per_kind - streams["valid"].c["inputs"] - streams["invalid"].c["inputs"] - len(anys))
    for _ in range(want):
        s.run(mutate_obj(rng.choice(corpus), rng, leaves))
    s.seconds = time.perf_counter() - t0
    a_how = {"hypothesis": len(anys), "mutated": want}

    row = {"what": t.what, "streams": {"valid": streams["valid"].row(s_how), "invalid": streams["invalid"].row(i_how),
                                       "any": streams["any"].row(a_how)}}
    rows = row["streams"].values()
    row.update({k: sum(x[k] for x in rows) for k in ("inputs", "exceptions_escaping", "invalid_accepted", "valid_refused")})
    row["seconds"] = round(sum(x["seconds"] for x in rows), 1)
    row["inputs_per_s"] = round(row["inputs"] / row["seconds"]) if row["seconds"] else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=100_000, help="inputs per target (all streams together)")
    ap.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    ap.add_argument("--seed", type=int, default=20251009)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    args = ap.parse_args()
    chosen = [t for t in TARGETS if not args.targets or t.name in args.targets.split(",")]
    t_all = time.perf_counter()
    results = {}
    for i, t in enumerate(chosen):
        row = fuzz_target(t, args.per_kind, args.seed + 1000 * i)
        results[t.name] = row
        print(f"{t.name:20s} {row['inputs']:7d} inputs  escaped {row['exceptions_escaping']}  invalid accepted "
              f"{row['invalid_accepted']}  valid refused {row['valid_refused']}  {row['inputs_per_s']}/s "
              f"({row['seconds']:.0f} s)", flush=True)
        for name, srow in row["streams"].items():
            for ex in srow["examples"]:
                print(f"    {name}: {ex}", flush=True)
    total = {k: sum(r[k] for r in results.values()) for k in ("inputs", "exceptions_escaping", "invalid_accepted",
                                                              "valid_refused")}
    total["seconds"] = round(time.perf_counter() - t_all, 1)
    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_average_at_end": [round(x, 1) for x in os.getloadavg()]},
           "per_kind": args.per_kind, "seed": args.seed,
           "pools": {"valid_draws": VALID_DRAWS, "invalid_draws": INVALID_DRAWS, "any_draws": ANY_DRAWS,
                     "bases": BASES, "bad_values_per_field": BAD_VALUES, "sealed": SEALED, "leaves": LEAVES},
           "total": total, "targets": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=repr) + "\n")
    print(f"total: {total['inputs']} inputs in {total['seconds']:.0f} s; exceptions escaping "
          f"{total['exceptions_escaping']}, invalid accepted {total['invalid_accepted']}, valid refused "
          f"{total['valid_refused']} -> {args.out}")


if __name__ == "__main__":
    main()
