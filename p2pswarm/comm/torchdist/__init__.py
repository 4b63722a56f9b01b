"""A swarm inside one trust domain over torch.distributed: one agent per rank, launched by torchrun.

    torchrun --nproc-per-node N -m p2pswarm run --comm torch --headless ...

    env.py          the torchrun environment: RankEnv, node names, threads and GPU per rank, RankFailure
    group.py        the process group's lifetime: set-up, heartbeats in the rendezvous store, collectives
                    that turn a backend error into one line naming the rank to blame, goodbye notes, close
    manager.py      TorchDistComm: publish / collect / peers / counters, each exchange a collective
    coordinator.py  TorchDistCoordinator: rank 0's round clock, and stop requests shared at a round boundary

Every exchange is a collective over the default process group, so all ranks call them in the same order:

    start-up   all_gather of each rank's announcement (peer id, node name, host, settings that must match)
    round      all_gather [resume point | finished round, stop wish]: rank 0's value is the swarm's clock
    stage      all_gather int64 [round, stage, nbytes]   (CPU tensors: gloo)
               all_gather uint8 [max nbytes]             (the rank's device: NCCL on CUDA, gloo on CPU)

The payload is the signed wire bytes every transport sends (p2pswarm.wire), never a pickle, so a bad rank's
bytes are validated and counted like any peer's (comm/core.py SignedTransport.accept), with the sender =
the peer id that rank announced. A rank that dies or hangs surfaces as one clear line (RankFailure) within
the process-group timeout, not a hang: each rank keeps a heartbeat counter in the rendezvous store, and the
rank that sees a collective fail reads them to name who stopped answering.

The game loop for lockstep ranks is p2pswarm.game.LockstepGameManager (node.py selects it for comm=torch).
"""

from p2pswarm.comm.torchdist.env import RankFailure, env_rank

# The CLI catches RankFailure and asks for the rank before the process group exists; both stay importable
# from the package so that it need not know the module layout.
__all__ = ["RankFailure", "env_rank"]
