"""Files in the shared folder are anyone's to write: what a hostile one does to the readers (nothing)."""

import json
import time

import pytest

from p2pswarm.analysis import format_status, get_experiment_status
from p2pswarm.comm.drive.records import Registration, parse_registration, registration_record, signed_record
from p2pswarm.comm.drive.store import FolderStore
from p2pswarm.identity import Identity

EXP = "untrusted"


def register(store: FolderStore, ident: Identity, node: str, **fields) -> None:
    body = {"name": node, "node": node, "role": "worker", "round": 1, "stage": 0, "time": time.time(), "left": False,
            "finished": 0, "bridged": 0, **fields}
    store.write_atomic(store.peer_path(node), signed_record(ident, body))


def test_a_signed_registration_with_a_time_of_infinity_is_not_live_for_ever(tmp_path):
    store = FolderStore(str(tmp_path), EXP)
    honest = Identity.generate()
    store.write_atomic(store.peer_path("ann"), registration_record(honest, Registration(
        "ann", honest.peer_id, "ann", "worker", 2, 0, time.time(), False)))
    mallory = Identity.generate()
    # Python's json writes and reads Infinity and NaN; each of these is signed by its writer
    register(store, mallory, "inf", time=float("inf"))
    register(store, mallory, "nan", time=float("nan"))
    register(store, mallory, "future", time=time.time() + 10 * 365 * 86400)
    register(store, mallory, "esc", name="\x1b[2J\x1b[31mpwned")
    register(store, mallory, "huge", round=10**30)
    register(store, mallory, "role", role="admin")
    register(store, mallory, "left", left="no")
    for node in ("inf", "nan", "future", "esc", "huge", "role", "left"):
        assert parse_registration(node, store.read_json(store.peer_path(node))) is None, node
    status = get_experiment_status(str(tmp_path), EXP)
    assert status["peer_ids"] == ["ann"] and status["invalid_peer_files"] == 7
    text = format_status(status)
    assert "\x1b" not in text


def test_the_clock_file_reads_its_round_or_nothing(tmp_path):
    store = FolderStore(str(tmp_path), EXP)
    for raw, expected in [
        (b'{"round": 3, "stage": 0, "updated": 1760000000.5, "coordinator_name": "keeper"}', 3),
        (b'{"round": NaN}', None), (b'{"round": Infinity}', None), (b'{"round": 1e400}', None),
        (b'{"round": 100000000000000000000000}', None), (b'{"round": -2}', None), (b'{"round": true}', None),
        (b'[' * 100_000, None), (b'{"round": 1' + b"0" * 5000 + b"}", None),
    ]:
        store.write_atomic(store.state_path(), raw)
        state = store.read_clock()
        assert (state and state["round"]) == expected, raw[:40]
    # the fork's optional fields: out of range reads as absent, the round still counts (NaN or Infinity anywhere
    # in the file, though, and it is not JSON we read)
    store.write_atomic(store.state_path(), json.dumps({"round": 4, "stage": "x", "updated": 1e300,
                                                      "coordinator_name": "a\x1bb", "coordinator": "me"}).encode())
    assert store.read_clock() == {"round": 4, "stage": 0, "started": None, "updated": None, "coordinator": None,
                                  "coordinator_name": None}
    status = get_experiment_status(str(tmp_path), EXP)
    assert status["current_round"] == 4 and "\x1b" not in format_status(status)


def test_a_json_file_over_the_cap_is_not_read(tmp_path):
    store = FolderStore(str(tmp_path), EXP)
    store.write_atomic(store.state_path(), b'{"round": 1, "pad": "' + b"x" * (2 << 20) + b'"}')
    assert store.read_clock() is None


def test_deeply_nested_json_is_refused_even_after_a_library_raised_the_recursion_limit():
    """py_ecc (imported with the in-process EVM of the chain tests) raises the recursion limit to 100000 for
    the whole process; json's C parser then overflows the machine stack on a file of brackets instead of
    raising. A subprocess, so that a crash is a failed assertion here rather than the end of the suite."""
    import subprocess
    import sys

    code = ("import sys; sys.setrecursionlimit(100000)\n"
            "from p2pswarm.comm.drive.store import parse_json\n"
            "assert parse_json('[' * 300000 + ']' * 300000) is None\n"
            "assert parse_json('{\"a\":' * 100000 + '1' + '}' * 100000) is None\n"
            "assert parse_json('{\"a\":' * 5 + '1' + '}' * 5) == {'a': {'a': {'a': {'a': {'a': 1}}}}}\n"
            "assert parse_json('{\"text\": \"' + '[' * 100000 + '\"}') is not None  # brackets in a string are text\n"
            "print('refused')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "refused" in done.stdout, (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("name, round", [
    ("round_5", 5), ("round_000012", 12), ("round_2147483647", 2**31 - 1),
    ("round_\u0665", None),  # an Arabic-Indic five: a digit to \d, not a round
    ("round_7\n", None), ("round_" + "9" * 5000, None), ("round_2147483648", None), ("round_1x", None),
])
def test_a_folder_name_is_a_round_only_in_ascii_digits_in_range(name, round):
    """Folder names in the shared folder are anyone's: never raise on one, never read an odd one as a round."""
    from p2pswarm.comm.drive.store import is_rollout_file, round_of, stage_of

    assert round_of(name) == round
    assert stage_of(name.replace("round_", "stage_")) == round
    assert is_rollout_file("n1.msgpack") and not is_rollout_file("n1.msgpack\n")
