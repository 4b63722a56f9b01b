"""Heterogeneous swarms: the specialists' warm start (scripts/build_default_policy.py --datasets) and the
rule bench/hetero.py measures transfer by."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import hetero  # noqa: E402


def test_a_specialist_warm_start_names_datasets_of_the_preset_only(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_default_policy.py"), "--datasets",
                           "basic_arithmetic,sudoku", "--steps", "1", "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "['sudoku'] not in the easy preset" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_the_specialists_cover_the_preset_and_alternate_over_agents():
    from p2pswarm.data.reasoning_gym import load_preset

    covered = [d for ds in hetero.SPECIALISTS.values() for d in ds]
    assert sorted(covered) == sorted(s["name"] for s in load_preset("easy"))  # each dataset: one specialist
    assert [hetero.specialist_of(i) for i in range(4)] == ["arith", "words", "arith", "words"]


def _agent(specialist: str, before: dict[str, float], after: dict[str, float]) -> dict:
    evals = lambda acc: {"eval_reward": sum(acc.values()) / len(acc), **{f"eval_{d}": v for d, v in acc.items()}}  # noqa: E731
    return {"specialist": specialist, "eval_before": evals(before), "eval_after": evals(after),
            "reward_local": [0.5, 0.6], "swarm_groups": [0, 4], "local_groups": [4, 4], "skipped_update": [False, True]}


def test_transfer_is_the_gain_on_missing_datasets_shared_minus_alone_paired_by_seed():
    zero = {"basic_arithmetic": 0.0, "chain_sum": 0.0, "leg_counting": 0.5, "letter_counting": 0.5, "spell_backward": 0.5}
    learned = dict(zero, basic_arithmetic=0.3, chain_sum=0.1)  # the words specialist picks up arithmetic
    own_up = dict(zero, leg_counting=0.8)  # ... or only gets better at its own datasets
    runs = [
        {"arm": "alone", "seed_index": 0, "per_agent": [_agent("words", zero, own_up)]},
        {"arm": "shared", "seed_index": 0, "per_agent": [_agent("words", zero, learned)]},
        {"arm": "shared", "seed_index": 1, "per_agent": [_agent("words", zero, learned)]},  # no pair: not counted
    ]
    s = hetero.summarise(runs)["words"]
    assert s["alone"]["gain_missing_datasets"] == pytest.approx(0.0)
    assert s["alone"]["gain_own_datasets"] == pytest.approx(0.1)
    assert s["shared"]["gain_missing_datasets"] == pytest.approx(0.2)
    assert s["transfer_shared_minus_alone"] == {"seeds": 1, "mean": pytest.approx(0.2), "std": None}
    assert s["shared"]["skipped_updates"] == pytest.approx(0.5)
