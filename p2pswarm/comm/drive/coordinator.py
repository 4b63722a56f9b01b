"""The round clock in state/current_state.json, and the janitor that retires old rounds.

Every node follows the clock: it plays max(its next round, the clock), so a node that joins late or fell
behind jumps ahead (the game loop logs the skipped rounds) and a fast node is never held back. The read
goes through core's MonotonicClock: a stale replica of the file never sends a node back.

The node with role `coordinator` (one per experiment; it trains too) also keeps the clock: a thread
advances it by the round rule every clock shares (comm/core.py `should_advance`: a quorum of the live
trainers that play along has finished the round, each saying so in its registration, or `round_deadline`
seconds after the first one did), persists it in the folder so that a restarted coordinator resumes
where it was, never rewinding, and retires rounds older than `keep_rounds` (deleted, or archived).
"""

from __future__ import annotations

import logging
import threading
import time

from p2pswarm.comm.core import MonotonicClock, RoundRule
from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.comm.drive.store import round_of
from p2pswarm.components import Coordinator

log = logging.getLogger(__name__)


class FolderCoordinator(Coordinator):
    """A Drive node's round clock: a follower of current_state.json, or (role='coordinator') its keeper.

    `clock` is the round as last read or written; it never goes back. The keeper's `step()` advances it
    by one when the round rule says the round is over (its thread calls it, catching up at once over
    rounds that are already over); `janitor()` retires old rounds. report_finished(r) puts "I trained r"
    in this node's registration, which is what the keeper's rule counts.
    """

    def __init__(self, comm: FolderComm, *, role: str = "worker", quorum: int = 0,
                 deadline: float = 300.0, keep_rounds: int = 0, archive: bool = False):
        self.comm, self.store = comm, comm.store
        self.role = role
        self.rule = RoundRule(quorum=quorum, deadline=deadline)
        self.keep_rounds = keep_rounds
        self.archive = archive
        self.seen = MonotonicClock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if role == "coordinator":
            state = self.store.read_clock()
            if state is None:
                self.write_clock(0)
                log.info("round clock started at round 0 in %s", self.store.base)
            else:
                self.seen.see([state["round"]])
                log.info("round clock resumed at round %d (persisted in %s)", self.clock, self.store.state_path())
            self._thread = threading.Thread(target=self._loop, name="round-clock", daemon=True)
            self._thread.start()
            comm.add_close_callback(self.close)

    @property
    def clock(self) -> int:
        return self.seen.round

    # ---- every node --------------------------------------------------------------------------------------
    def current(self) -> int:
        """The clock: as read now (never lower than a reading seen before), or as this keeper wrote it."""
        if self.role != "coordinator":
            state = self.store.read_clock()
            if state is not None:
                self.seen.see([state["round"]])
        return max(self.clock, 0)

    def start_round(self, resume_from: int) -> int:
        return max(resume_from, self.current())

    def report_finished(self, round: int) -> None:
        self.comm.set_position(finished=round)  # the keeper's rule reads it from our registration

    def next_round(self, finished: int) -> int:
        return max(finished + 1, self.current())

    # ---- the keeper ---------------------------------------------------------------------------------------
    def write_clock(self, round: int) -> None:
        """Persist `round` as the swarm's clock; ValueError for a round below the clock (it never rewinds)."""
        if round < self.clock:
            raise ValueError("the round clock never rewinds")
        now = time.time()
        # The fork's fields: its readers (and `p2pswarm status`) show the round, the stage and who keeps it.
        self.store.write_clock({"round": round, "stage": 0, "started": now, "updated": now,
                                "coordinator": self.comm.peer_id, "coordinator_name": self.comm.name})
        self.seen.see([round])

    def step(self, now: float | None = None) -> bool:
        """Advance the clock by one if the round rule says its round is over; True if it moved.

        The trainers are the live registrations and this node itself, from memory (its own file may lag
        on a synced mount); a keeper that has not played yet is at (-1, -1), which the rule neither waits
        for nor counts.
        """
        trainers = {n: r.progress for n, r in self.comm.live().items()}
        trainers[self.comm.node] = self.comm.progress
        round = self.clock
        if not self.rule.step(round, trainers, now):
            return False
        self.write_clock(round + 1)
        done = sum(1 for p in trainers.values() if p.finished >= round)
        log.info("round clock advanced to round %d (%d of %d live node(s) finished round %d)",
                 round + 1, done, len(trainers), round)
        return True

    def janitor(self) -> None:
        """Retire rounds before clock - keep_rounds: archive (move) them if configured, else delete them.
        A failed archive leaves the round where it is."""
        if self.keep_rounds <= 0:
            return
        for folder in self.store.subfolders(self.store.path("rollouts")):
            r = round_of(folder)
            if r is None or r >= self.clock - self.keep_rounds:
                continue
            src = self.store.round_dir(r)
            try:
                if self.archive:
                    self.store.move(src, self.store.path("archive", "rollouts", folder))
                else:
                    self.store.remove(src)
            except OSError as e:
                log.warning("could not %s %s (kept): %s", "archive" if self.archive else "delete", src, e)

    def _loop(self) -> None:
        delay = self.comm.poll
        while not self._stop.wait(delay):
            try:
                moved = False
                while self.step():  # catch up at once when several rounds are already over
                    moved = True
                if moved:
                    self.janitor()
                delay = self.comm.poll if moved else min(delay * 1.5, 4 * self.comm.poll)
            except Exception as e:  # noqa: BLE001 - a flaky mount must not kill the clock
                log.warning("round clock: %s: %s", type(e).__name__, e)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
