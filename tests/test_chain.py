"""The chain clock against a real EVM in this process (eth-tester + py-evm): our contract, Gensyn's shipped
0.4.2 bytecode, the client's failure lines, and agents following the chain's rounds."""

import logging
import threading
import time

import pytest

pytest.importorskip("web3", reason="the chain tests need web3[tester] (the dev extra)")
pytest.importorskip("eth_tester", reason="the chain tests need web3[tester] (the dev extra)")

from eth_account import Account  # noqa: E402

from p2pswarm.comm.chain.client import ChainClient, ChainError, connect, make_proof, proof_ok  # noqa: E402
from p2pswarm.comm.chain.coordinator import ChainCoordinator  # noqa: E402
from p2pswarm.comm.chain.local import LocalChain  # noqa: E402
from p2pswarm.identity import Identity  # noqa: E402


@pytest.fixture(scope="module")
def chain():
    return LocalChain.inprocess(stage_seconds=2)


@pytest.fixture(scope="module")
def gensyn():
    return LocalChain.inprocess(flavour="gensyn-0.4.2")


def fresh(chain: LocalChain, stage_seconds: int = 2) -> tuple[ChainClient, Identity]:
    """A new contract and a funded account with an identity: tests do not share state."""
    contract = chain.deploy(stage_seconds)
    return chain.client(Account.create(), contract=contract), Identity.generate()


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


# ---- the contract, through the client ----------------------------------------------------------------------
def test_register_is_idempotent_and_proven(chain):
    client, me = fresh(chain)
    assert client.register(me) is True
    assert client.register(me) is False  # a restarted node finds itself registered
    [reg] = client.registrations()
    assert (reg.eoa, reg.peer_id, reg.proven) == (client.eoa, me.peer_id, True)


def test_duplicate_registration_reverts_with_the_named_error(chain):
    client, me = fresh(chain)
    client.register(me)
    with pytest.raises(ChainError, match="PeerIdAlreadyRegistered"):
        client.transact("registerPeer", me.peer_id)


def test_a_foreign_peer_id_or_a_spoofed_proof_is_ignored_and_does_not_block_the_owner(chain):
    owner_client, owner = fresh(chain)
    squatter = chain.client(Account.create(), contract=owner_client.address)
    squatter.transact("registerPeer", owner.peer_id)  # Gensyn's call: no proof
    forger = chain.client(Account.create(), contract=owner_client.address)
    forged = make_proof(Identity.generate(), forger.chain_id, forger.address, forger.eoa)  # signed by another key
    forger.transact("registerPeerWithProof", owner.peer_id, forged)
    replayed = make_proof(owner, owner_client.chain_id, owner_client.address, owner_client.eoa)  # the owner's, for its address
    other = chain.client(Account.create(), contract=owner_client.address)
    other.transact("registerPeerWithProof", owner.peer_id, replayed)
    assert owner_client.register(owner) is True  # squatting does not block the owner
    rows = [(r.eoa, r.proven) for r in owner_client.registrations()]
    assert rows == [(squatter.eoa, False), (forger.eoa, False), (other.eoa, False), (owner_client.eoa, True)]
    assert not proof_ok("not-a-peer-id", replayed, owner_client.chain_id, owner_client.address, owner_client.eoa)


def test_advance_only_after_the_stage_deadline_and_never_back(chain):
    client, _ = fresh(chain, stage_seconds=2)
    assert client.round() == (0, 0)
    assert client.advance() is False  # StageNotOver: refused by the pre-flight, nothing sent
    with pytest.raises(ChainError, match="StageNotOver"):
        client.transact("updateStageAndRound")
    wait_for(lambda: client.chain_time() >= client.deadline(), timeout=10)
    assert client.advance() is True
    assert client.round() == (1, 0)
    assert client.advance() is False  # the new stage has its own deadline


def test_an_advance_that_lost_the_race_does_not_end_the_next_round(chain):
    # Two peers read round 0 over; one advances; the other's advance lands once round 1 has also lasted its
    # duration: naming the round it read, it ends nothing (a bare updateStageAndRound would end round 1).
    client, _ = fresh(chain, stage_seconds=1)
    late = chain.client(Account.create(), contract=client.address)
    wait_for(lambda: client.chain_time() >= client.deadline(), timeout=10)
    assert client.advance(at=(0, 0)) is True
    wait_for(lambda: client.chain_time() >= client.deadline(), timeout=10)
    assert late.advance(at=(0, 0)) is False  # StageAlreadyAdvanced
    assert client.round() == (1, 0)
    assert late.advance(at=(1, 0)) is True and client.round() == (2, 0)


def test_rewards_and_winners_once_per_round(chain):
    client, me = fresh(chain, stage_seconds=1)
    client.register(me)
    assert client.submit_reward(0, 0, 0.75, me.peer_id) is True
    assert client.submit_reward(0, 0, 0.5, me.peer_id) is False  # RewardAlreadySubmitted
    assert client.submit_reward(5, 0, 1.0, me.peer_id) is False  # InvalidRoundNumber: a future round
    assert client.total_reward(me.peer_id, client.eoa) == 0.75
    winner = Identity.generate().peer_id
    with pytest.raises(ChainError, match="InvalidVote"):
        client.transact("submitWinners", 0, [winner, winner], me.peer_id)
    assert client.submit_winners(0, [winner], me.peer_id) is True
    assert client.submit_winners(0, [winner], me.peer_id) is False  # WinnerAlreadyVoted
    stranger = chain.client(Account.create(), contract=client.address)
    with pytest.raises(ChainError, match="InvalidVoterPeerId"):  # rewards only for a peer id one has claimed
        stranger.submit_reward(0, 0, 1.0, me.peer_id)


def test_the_same_client_drives_gensyns_shipped_contract(gensyn):
    client = gensyn.client(Account.create())
    me = Identity.generate()
    assert client.register(me) is True
    assert client.register(me) is False
    assert client.round() == (0, 0)
    assert client.advance() is False  # OnlyStageManager: a follower
    assert client.submit_reward(0, 0, 2.0, me.peer_id) is True
    assert client.submit_reward(0, 0, 2.0, me.peer_id) is False
    assert client.total_reward(me.peer_id, client.eoa) == 2.0
    other = gensyn.client(Account.create())
    with pytest.raises(ChainError, match="registered to .* lets the first claim win"):
        other.register(me)
    gensyn.w3.eth.wait_for_transaction_receipt(
        other.contract.functions.updateStageAndRound().transact({"from": gensyn.dev}))  # Gensyn's stage manager
    assert client.round() == (0, 1)  # 0.4.2's rounds have stageCount() == 3 stages


# ---- the coordinator ----------------------------------------------------------------------------------------
def test_coordinator_starts_at_the_chains_round_advances_past_the_deadline_and_never_goes_back(chain):
    client, me = fresh(chain, stage_seconds=1)
    coord = ChainCoordinator(client, me, poll=0.05)
    assert client.registered(me.peer_id)
    assert coord.start_round(0) == 0
    assert coord.next_round(0) == 1  # waited for the deadline, then advanced the chain itself
    assert client.round()[0] == 1
    assert coord.start_round(7) == 7  # a node resumed ahead of the chain keeps its round
    assert coord.next_round(7) == 8  # and paces itself while the chain is behind
    other = ChainCoordinator(chain.client(Account.create(), contract=client.address), Identity.generate(), poll=0.05)
    assert other.next_round(1) == 2  # one of the two advanced; the other read the new round
    coord.seen.see([5])
    assert coord.current() == 5  # a lower reading never sends the clock back


def test_coordinator_submits_the_rounds_reward_once(chain):
    from p2pswarm import events as ev

    client, me = fresh(chain, stage_seconds=1)
    coord = ChainCoordinator(client, me, poll=0.05, submit_rewards=True, winners=True)
    peer = Identity.generate().peer_id
    coord.on_event(ev.Event(ev.ROLLOUTS_RECEIVED, me.peer_id, {"round": 0, "peer_rewards": {peer: 0.5}}))
    coord.on_event(ev.Event(ev.ROUND_FINISHED, me.peer_id, {"round": 0, "reward_local_mean": 0.25}))
    coord.report_finished(0)
    coord.report_finished(0)
    assert client.total_reward(me.peer_id, client.eoa) == 0.25
    assert client.view("hasSubmittedWinners", 0, me.peer_id, client.eoa)


def test_a_failing_chain_mid_run_is_one_line_and_the_last_reading_stands(chain, caplog):
    client, me = fresh(chain, stage_seconds=1)
    coord = ChainCoordinator(client, me, poll=0.05)
    coord.start_round(0)

    def broken(*a):
        raise ConnectionError("connection refused")

    client.round = broken
    with caplog.at_level(logging.WARNING):
        assert coord.current() == 0
        assert coord.current() == 0
    lines = [r for r in caplog.records if "chain clock" in r.getMessage()]
    assert len(lines) == 1 and "connection refused" in lines[0].getMessage()


def test_status_reads_the_round_and_this_nodes_registration_and_keeps_the_last_reading_on_failure(chain, gensyn):
    from p2pswarm.comm.chain.coordinator import PROVEN, UNPROVEN

    client, me = fresh(chain)
    assert client.own_registration(me.peer_id) is None
    coord = ChainCoordinator(client, me)  # registers, with a proof
    st = coord.status()
    assert (st.round, st.stage, st.stages, st.registration, st.flavour, st.error) == (0, 0, 1, PROVEN, "p2pswarm", "")
    # Gensyn's contract holds no proofs: registered without one
    g = ChainCoordinator(gensyn.client(Account.create()), Identity.generate())
    assert g.status().registration == UNPROVEN and g.status().flavour == "gensyn-0.4.2"

    def broken(*a):
        raise ConnectionError("connection refused")

    client.round = broken
    failed = coord.status()
    assert failed.round == 0 and failed.registration == PROVEN and failed.error == "ConnectionError: connection refused"


# ---- every failure path: one line ----------------------------------------------------------------------------
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


def test_rpc_unreachable(tmp_path):
    with pytest.raises(ChainError) as e:
        connect("http://127.0.0.1:9", "0x" + "11" * 20, tmp_path / "chain.key")
    assert "cannot reach the chain at http://127.0.0.1:9" in one_line(e)


def test_wrong_chain_id(chain):
    with pytest.raises(ChainError) as e:
        ChainClient(chain.w3, chain.contract, Account.create(), chain_id=1)
    assert "not the expected 1" in one_line(e)


def test_contract_missing(chain):
    with pytest.raises(ChainError) as e:
        ChainClient(chain.w3, "0x" + "22" * 20, Account.create())
    assert "no contract at" in one_line(e)


def test_unfunded_key(chain):
    client = ChainClient(chain.w3, chain.contract, Account.create())  # never funded
    with pytest.raises(ChainError) as e:
        client.register(Identity.generate())
    assert "holds 0 wei" in one_line(e) and "fund it" in one_line(e)


def test_key_file_is_private_and_reused(tmp_path):
    from p2pswarm.comm.chain.client import load_or_create_key

    path = tmp_path / "chain.key"
    a = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path).address == a.address
    path.chmod(0o644)
    with pytest.raises(ChainError, match="chmod 600"):
        load_or_create_key(path)


def test_shipped_artifact_is_of_the_current_source():
    from p2pswarm.comm.chain import build

    import json

    assert json.loads(build.ARTIFACT.read_text())["source_sha256"] == build.source_digest()


# ---- agents following the chain's rounds ---------------------------------------------------------------------
def test_agents_in_one_process_follow_the_chains_rounds(tmp_path):
    from helpers import events, make_settings, metrics

    from p2pswarm.comm.chain import local_chain
    from p2pswarm.node import build_swarm, run_agents

    s = make_settings(tmp_path, agents=2, rounds=3, collect_timeout=60, chain="local", chain_round_seconds=1,
                      chain_poll=0.1, chain_submit_rewards=True, experiment="chain-agents", tasks_per_round=2)
    agents = build_swarm(s)
    run_agents(agents)
    client = agents[0].coordinator.client
    assert client.round()[0] == 2  # advanced by the agents themselves after rounds 0 and 1
    regs = client.registrations()
    assert {r.peer_id for r in regs if r.proven} == {a.peer_id for a in agents}
    for a in agents:
        played = [r["round"] for r in metrics(a)]
        # Rounds end on the chain's deadline, not on a quorum: an agent slower than a whole round skips the
        # round it missed (and says so); none ever goes back.
        skipped = [r for e in events(a) if e["kind"] == "rounds_skipped" for r in range(e["first"], e["last"] + 1)]
        assert played == sorted(set(played)) and played[0] == 0 and played[-1] == 2
        assert sorted(played + skipped) == [0, 1, 2]
        assert a.coordinator.client.view("hasSubmittedReward", 0, 0, a.peer_id, a.coordinator.client.eoa)
    assert agents[1].coordinator.client.address == local_chain("chain-agents", 1).contract  # one chain, shared


def test_chain_settings_are_checked():
    from p2pswarm.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="chain_contract"):
        load_settings(chain="http://127.0.0.1:8545")
    with pytest.raises(SettingsError, match="'local' or an http"):
        load_settings(chain="ws://x")
    s = load_settings(chain="http://127.0.0.1:8545", chain_contract="0x" + "11" * 20, chain_id=31337)
    assert s.chain_abi == "p2pswarm"
