# pragma version ~=0.4.3
# SPDX-License-Identifier: MIT
"""
@title p2pswarm's SwarmCoordinator
@notice The swarm's round clock and registry, speaking the subset of Gensyn's SwarmCoordinator 0.4.2 that
        RL Swarm's clients call (same function names, arguments, custom errors and events), with two
        differences that remove its trusted parties:
        - advancement is permissionless: anyone may call updateStageAndRound() once the stage has lasted
          `stageDuration` seconds (Gensyn: only a stage manager, whenever it likes);
        - a peer id may be claimed by several addresses, each claim carrying an optional Ed25519 proof
          (the peer's signature over chain id, contract address and claiming address) that peers verify
          off-chain; a claim without a valid proof is ignored by them. Gensyn's first claim wins for
          good, so anyone could squat another's peer id.
        Rewards and winners are self-reported, as in Gensyn: the contract only keeps them once per round.
"""

event StageAdvanced:
    roundNumber: indexed(uint256)
    newStage: uint256

event RoundAdvanced:
    newRoundNumber: indexed(uint256)

event PeerRegistered:
    eoa: indexed(address)
    peerId: String[128]

event BootnodesAdded:
    manager: indexed(address)
    count: uint256

event WinnerSubmitted:
    account: indexed(address)
    peerId: String[128]
    roundNumber: indexed(uint256)
    winners: DynArray[String[128], 32]

event RewardSubmitted:
    account: indexed(address)
    roundNumber: indexed(uint256)
    stageNumber: indexed(uint256)
    reward: int256
    peerId: String[128]

event CumulativeRewardsUpdated:
    account: indexed(address)
    peerId: String[128]
    totalRewards: int256

struct Registration:
    eoa: address
    peerId: String[128]
    proof: Bytes[64]

owner: public(address)
stageDuration: public(uint256)
stageCount: public(uint256)
stageStartedAt: public(uint256)
registrationCount: public(uint256)
registration: public(HashMap[uint256, Registration])

_round: uint256
_stage: uint256
_claimed: HashMap[bytes32, HashMap[address, bool]]
_rewarded: HashMap[uint256, HashMap[uint256, HashMap[bytes32, HashMap[address, bool]]]]
_voted: HashMap[uint256, HashMap[bytes32, HashMap[address, bool]]]
_total: HashMap[bytes32, HashMap[address, int256]]
_bootnodes: DynArray[String[256], 32]


@deploy
def __init__(stage_duration: uint256, stage_count: uint256):
    if stage_count == 0 or stage_count > 16:
        raw_revert(method_id("StageOutOfBounds()", output_type=Bytes[4]))
    self.owner = msg.sender
    self.stageDuration = stage_duration
    self.stageCount = stage_count
    self.stageStartedAt = block.timestamp


@external
@view
def currentRound() -> uint256:
    return self._round


@external
@view
def currentStage() -> uint256:
    return self._stage


@external
@view
def stageDeadline() -> uint256:
    """@notice The time (block timestamp) from which anyone may advance the current stage."""
    return self.stageStartedAt + self.stageDuration


@external
def updateStageAndRound() -> (uint256, uint256):
    return self._advance()


@external
def advanceFrom(roundNumber: uint256, stage: uint256) -> (uint256, uint256):
    """@notice updateStageAndRound() only while the clock still reads (roundNumber, stage). Two peers that read
               the same finished stage both send an advance; without this guard the second one, mined once the
               next stage has also lasted stageDuration (a slow peer, a congested chain), would end a stage
               nobody has played."""
    if roundNumber != self._round or stage != self._stage:
        raw_revert(method_id("StageAlreadyAdvanced()", output_type=Bytes[4]))
    return self._advance()


@internal
def _advance() -> (uint256, uint256):
    if block.timestamp < self.stageStartedAt + self.stageDuration:
        raw_revert(method_id("StageNotOver()", output_type=Bytes[4]))
    if self._stage + 1 >= self.stageCount:
        self._round += 1
        self._stage = 0
        log RoundAdvanced(newRoundNumber=self._round)
    else:
        self._stage += 1
    self.stageStartedAt = block.timestamp
    log StageAdvanced(roundNumber=self._round, newStage=self._stage)
    return (self._round, self._stage)


@internal
def _register(peerId: String[128], proof: Bytes[64]):
    if len(peerId) == 0:
        raw_revert(method_id("InvalidVoterPeerId()", output_type=Bytes[4]))
    key: bytes32 = keccak256(peerId)
    if self._claimed[key][msg.sender]:
        raw_revert(method_id("PeerIdAlreadyRegistered()", output_type=Bytes[4]))
    self._claimed[key][msg.sender] = True
    self.registration[self.registrationCount] = Registration(eoa=msg.sender, peerId=peerId, proof=proof)
    self.registrationCount += 1
    log PeerRegistered(eoa=msg.sender, peerId=peerId)


@external
def registerPeer(peerId: String[128]):
    """@notice Gensyn's registration: a claim without proof, which p2pswarm peers ignore."""
    self._register(peerId, b"")


@external
def registerPeerWithProof(peerId: String[128], proof: Bytes[64]):
    """@notice A claim with the peer's Ed25519 signature over (chain id, this contract, msg.sender)."""
    self._register(peerId, proof)


@external
@view
def isRegistered(peerId: String[128], eoa: address) -> bool:
    return self._claimed[keccak256(peerId)][eoa]


@external
def submitReward(roundNumber: uint256, stageNumber: uint256, reward: int256, peerId: String[128]):
    if roundNumber > self._round:
        raw_revert(method_id("InvalidRoundNumber()", output_type=Bytes[4]))
    if roundNumber == self._round and stageNumber > self._stage:
        raw_revert(method_id("InvalidStageNumber()", output_type=Bytes[4]))
    if stageNumber >= self.stageCount:
        raw_revert(method_id("InvalidStageNumber()", output_type=Bytes[4]))
    key: bytes32 = keccak256(peerId)
    if self._rewarded[roundNumber][stageNumber][key][msg.sender]:
        raw_revert(method_id("RewardAlreadySubmitted()", output_type=Bytes[4]))
    if not self._claimed[key][msg.sender]:
        raw_revert(method_id("InvalidVoterPeerId()", output_type=Bytes[4]))
    self._rewarded[roundNumber][stageNumber][key][msg.sender] = True
    self._total[key][msg.sender] += reward
    log RewardSubmitted(account=msg.sender, roundNumber=roundNumber, stageNumber=stageNumber, reward=reward,
                        peerId=peerId)
    log CumulativeRewardsUpdated(account=msg.sender, peerId=peerId, totalRewards=self._total[key][msg.sender])


@external
@view
def hasSubmittedReward(roundNumber: uint256, stageNumber: uint256, peerId: String[128], eoa: address) -> bool:
    return self._rewarded[roundNumber][stageNumber][keccak256(peerId)][eoa]


@external
@view
def totalReward(peerId: String[128], eoa: address) -> int256:
    return self._total[keccak256(peerId)][eoa]


@external
def submitWinners(roundNumber: uint256, winners: DynArray[String[128], 32], peerId: String[128]):
    if roundNumber > self._round:
        raw_revert(method_id("InvalidRoundNumber()", output_type=Bytes[4]))
    key: bytes32 = keccak256(peerId)
    if self._voted[roundNumber][key][msg.sender]:
        raw_revert(method_id("WinnerAlreadyVoted()", output_type=Bytes[4]))
    if not self._claimed[key][msg.sender]:
        raw_revert(method_id("InvalidVoterPeerId()", output_type=Bytes[4]))
    for i: uint256 in range(len(winners), bound=32):
        for j: uint256 in range(i + 1, len(winners), bound=32):
            if keccak256(winners[i]) == keccak256(winners[j]):
                raw_revert(method_id("InvalidVote()", output_type=Bytes[4]))
    self._voted[roundNumber][key][msg.sender] = True
    log WinnerSubmitted(account=msg.sender, peerId=peerId, roundNumber=roundNumber, winners=winners)


@external
@view
def hasSubmittedWinners(roundNumber: uint256, peerId: String[128], eoa: address) -> bool:
    return self._voted[roundNumber][keccak256(peerId)][eoa]


@external
def addBootnodes(newBootnodes: DynArray[String[256], 32]):
    if msg.sender != self.owner:
        raw_revert(method_id("OnlyBootnodeManager()", output_type=Bytes[4]))
    for b: String[256] in newBootnodes:
        self._bootnodes.append(b)
    log BootnodesAdded(manager=msg.sender, count=len(newBootnodes))


@external
@view
def getBootnodes() -> DynArray[String[256], 32]:
    return self._bootnodes


@external
@view
def getBootnodesCount() -> uint256:
    return len(self._bootnodes)
