"""The round clock in state/current_state.json, and the janitor that retires old rounds.

Every node follows the clock: it plays max(its next round, the clock), so a node that joins late or fell
behind jumps ahead (the game loop logs the skipped rounds) and a fast node is never held back. The read
goes through core's MonotonicClock: a stale replica of the file never sends a node back.

The node with role `coordinator` (one per experiment; it trains too) also keeps the clock: a thread
advances it by the round rule every clock shares (comm/core.py `should_advance`: a quorum of the live
trainers that play along has finished the round, each saying so in its registration, or `round_deadline`
seconds after the first one did), persists it in the folder so that a restarted coordinator resumes
where it was, never rewinding, and, when cleanup is configured, retires rounds older than `keep_rounds`
(deleted, or archived).

The folder may be shared with the rl-swarm Drive fork's nodes, so a keeper deletes or overwrites nothing
that it did not write: it adopts the round of a clock file another coordinator wrote (the fork's has only
`round`, `stage`, `updated_at`, `updated_by`) and rewrites it with every field the fork's readers use,
keeping the fork's own; by default it retires nothing (the fork keeps every round unless its cleanup is
on); and its janitor retires only rollout files of a format it knows, leaving anything else where it is.
"""

from __future__ import annotations

import logging
import threading
import time

from p2pswarm.comm.core import MonotonicClock, RoundRule
from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.comm.drive.store import (MAX_JSON_BYTES, clock_record, is_rollout_file, kept_clock_fields, parse_clock,
                                       round_of, stage_of)
from p2pswarm.components import Coordinator
from p2pswarm.errors import UserError

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
        self._kept: dict = {}  # the fork's fields of the clock file, kept across our rewrites
        if role == "coordinator":
            raw = self.store.read_json(self.store.state_path())
            state = parse_clock(raw)
            if state is None:
                self._set_aside_unreadable_clock()
                self.write_clock(0)
                log.info("round clock started at round 0 in %s", self.store.base)
            else:
                self._kept = kept_clock_fields(raw)
                self.seen.see([state["round"]])
                if state["coordinator"] is None:  # no field of ours: the fork's coordinator (or an older one) wrote it
                    log.info("round clock adopted at round %d from %s, kept by %s until now; keeping it from here "
                             "in a format its readers still read", self.clock, self.store.state_path(),
                             state["coordinator_name"] or "another coordinator")
                else:
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
        record = clock_record(round, now=time.time(), coordinator=self.comm.peer_id,
                              coordinator_name=self.comm.name, kept=self._kept)
        self.store.write_clock(record)
        self._kept = kept_clock_fields(record)
        self.seen.see([round])

    def _set_aside_unreadable_clock(self) -> None:
        """A clock file with no round we can read is someone's, not ours to replace: it is renamed beside
        itself (`current_state.json.unreadable-<time>`) before a new clock starts. UserError when it cannot
        be read at all (a mount that hiccups must not rewind the swarm to round 0) or set aside."""
        path = self.store.state_path()
        try:
            if not self.store.fs.exists(path):
                return
            if self.store.read(path, MAX_JSON_BYTES) is None:
                raise OSError("it cannot be read, or is over 1 MiB")
            aside = f"{path}.unreadable-{int(time.time())}"
            self.store.move(path, aside)
        except OSError as e:
            raise UserError(f"{path} holds no round this coordinator can read and was left as it is ({e}): "
                            "fix it or move it away, then start again") from None
        log.warning("%s held no round this coordinator can read: kept as %s, round clock started afresh", path, aside)

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
        """Retire rounds before clock - keep_rounds (keep_rounds 0: keep every round): archive (move) their
        rollout files if configured, else delete them; then remove the stage and round folders left empty.

        Only rollout files of a known format (ours, the fork's) in `stage_S` folders go, whoever wrote
        them (the user asked for cleanup; the fork's own cleanup would remove them too); anything else in
        a round folder (a file or folder it does not know, another writer's temporary) stays, and with it
        its folder. An archived file never replaces one already in the archive, and a move that fails
        leaves the file where it is: an archive never deletes."""
        if self.keep_rounds <= 0:
            return
        retired, done, kept = [], 0, 0
        verb = "archive" if self.archive else "delete"
        for folder in self.store.subfolders(self.store.path("rollouts")):
            r = round_of(folder)
            if r is None or r >= self.clock - self.keep_rounds:
                continue
            src = self.store.path("rollouts", folder)
            for stage in self.store.subfolders(src):
                if stage_of(stage) is None:
                    continue
                for fname, _, _ in self.store.listing(f"{src}/{stage}"):
                    if not is_rollout_file(fname):
                        continue
                    path = f"{src}/{stage}/{fname}"
                    try:
                        if self.archive:
                            self.store.move(path, self.store.path("archive", "rollouts", folder, stage, fname))
                        else:
                            self.store.remove(path)
                        done += 1
                    except OSError as e:
                        kept += 1
                        log.warning("could not %s %s (kept): %s", verb, path, e)
                self.store.remove_empty_folder(f"{src}/{stage}")
            if not self.store.remove_empty_folder(src):
                kept += 1
            retired.append(r)
        if retired:
            log.info("retired round(s) %s: %d rollout file(s) %s%s", _spans(sorted(retired)), done,
                     "archived to " + self.store.path("archive", "rollouts") if self.archive else "deleted",
                     f"; {kept} file(s) or folder(s) kept" if kept else "")

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
        """Stop the keeper's thread, then advance the clock over the rounds already over: a keeper that
        plays its last round faster than the thread polls must not leave the clock behind it (a follower,
        the fork's readers or this keeper restarted would start a round it already played)."""
        self._stop.set()
        if self._thread is None or self._thread is threading.current_thread():
            return
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # stuck on a slow mount: two writers of the clock would race
            return
        try:
            while self.step():
                pass
        except Exception as e:  # noqa: BLE001 - closing must not raise over a flaky mount
            log.warning("round clock: not advanced at close: %s: %s", type(e).__name__, e)


def _spans(rounds: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7": a janitor log line stays one short line over many rounds."""
    out: list[str] = []
    for r in rounds:
        if out and r == int(out[-1].rsplit("-", 1)[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)
