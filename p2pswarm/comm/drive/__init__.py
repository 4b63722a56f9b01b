"""Drive mode (`--comm drive`): the swarm through a shared folder (Google Drive in Colab, Drive for
desktop, an rclone mount, NFS, any fsspec URL).

    store.py        FolderStore: the folder through fsspec (atomic writes, listings, bounded reads, the
                    clock file); safe_name, the one mapping from a node name to its file names
    records.py      signed JSON records: registrations (+ heartbeats) and checkpoint manifests
    fork.py         the rl-swarm fork's unsigned files (registrations, .json rollouts, reward submissions),
                    read and written only with drive_trust_folder (mixed experiments)
    manager.py      FolderComm: heartbeat, registrations, publish / relay, collect, counters
    coordinator.py  FolderCoordinator: follows the round clock, or keeps it (the round rule) and retires
                    old rounds
    mirror.py       DriveMirror: a node's logs and checkpoints in the folder, and resuming from them
    forkfiles.py    the rl-swarm Drive fork's monitoring files: written for its readers, read (validated) by ours

The folder (the rl-swarm Drive fork's layout; every file has one writer):

    <root>/experiments/<name>/state/current_state.json                 round clock (the coordinator writes it)
    <root>/experiments/<name>/peers/<node>.json                        registration + heartbeat (signed)
    <root>/experiments/<name>/rollouts/round_R/stage_S/<node>.msgpack  the signed wire bytes (p2pswarm.wire)
    <root>/experiments/<name>/rollouts/round_R/stage_S/<node>~<peer id>.msgpack
                                                                       a batch a bridge (comm=hybrid) relays
    <root>/experiments/<name>/archive/rollouts/round_R/                old rounds, when archiving is on
    <root>/experiments/<name>/logs/<node>/metrics.jsonl, events.jsonl   copies of the node's run-folder logs
    <root>/experiments/<name>/logs/<node>/cumulative_metrics.jsonl, training_events.jsonl,
    <root>/experiments/<name>/progress_<node>.json, rewards/round_R/stage_0/<node>.json   for the fork's readers
    <root>/experiments/<name>/checkpoints/<node>/round_NNNNNN/         its last checkpoints, signed manifest

Readers distrust whatever they find: a rollout file is accepted only through the core's Inbox, signed by
the peer id its node registered; a registration only with a valid signature. Anything else is counted
by reason and skipped; nothing a file contains can raise into the round.
"""
