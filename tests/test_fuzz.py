"""The fuzz harness in its CI form: every decoder and validator of peers' input, a few dozen generated inputs
per stream, derandomized (the same inputs every run). bench/fuzz.py runs the same targets with >= 100,000
inputs each and records the figures in bench/results/fuzz.json.

For each target (tests/fuzz_targets.py): valid inputs are accepted, invalid ones (built invalid) refused,
and no input at all makes the parser raise; whatever is accepted satisfies the target's invariant."""

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import ACCEPTED, ESCAPED, REFUSED, TARGETS, outcome

CI = settings(max_examples=40, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
@pytest.mark.parametrize("stream", ["valid", "invalid", "any"])
def test_fuzz(target, stream):
    @CI
    @given(getattr(target, stream))
    def check(x):
        result, out = outcome(target, x)
        assert result != ESCAPED, f"{target.name}: {type(out).__name__}: {out}"
        if stream == "valid":
            assert result == ACCEPTED, f"{target.name}: a valid input was refused"
        if stream == "invalid":
            assert result == REFUSED, f"{target.name}: an invalid input was accepted: {out!r}"[:500]
        if result == ACCEPTED:
            assert target.invariant(out), f"{target.name}: accepted {out!r}"[:500]

    check()


BYTES_TARGETS = [t for t in TARGETS if t.name in ("wire_bytes", "wire_struct", "drive_registration", "drive_clock",
                                                   "drive_manifest", "torch_announcement", "payload_request",
                                                   "gossip_message", "catchup_request")]


@pytest.mark.parametrize("target", BYTES_TARGETS, ids=lambda t: t.name)
def test_extreme_inputs_are_refused_without_raising(target):
    """Nesting past any parser's recursion limit, 5000-digit numbers, lengths of 4 GiB announced in a header,
    NaN and Infinity in JSON: every one is refused, none raises."""
    from fuzz_targets import EDGE_BYTES

    for data in EDGE_BYTES:
        result, out = outcome(target, data)
        assert result == REFUSED, (target.name, data[:20], result, out)
