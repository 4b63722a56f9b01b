"""The round clock in state/current_state.json, and the janitor that retires old rounds.

Every node follows the clock: it plays max(its next round, the clock), so a node that joins late or fell
behind jumps ahead (the game loop logs the skipped rounds) and a fast node is never held back. The read
goes through core's MonotonicClock: a stale replica of the file never sends a node back.

The clock file is unsigned (the fork's readers and writers use it as it is), so anyone who can write to the
folder can write any round in it. A reading is therefore adopted only when it is plausible: at most
CLOCK_MARGIN rounds past the furthest round that a live node's registration (signed; a fork node's, from its
reward submissions, only with drive_trust_folder) says it finished, or no further than this node gets by
itself, and below MAX_CLOCK. A reading past that is not adopted and not remembered (the MonotonicClock sees
accepted readings only): it is counted (`dropped_implausible_clock`), logged once until a plausible reading
comes again, and the node goes on with its own next round. A node legitimately far behind still jumps: the
live nodes' registrations show the rounds they finished. A keeper judges the file it starts with at
start_round, when its own checkpoint can vouch for it too: an implausible one is set aside
(`current_state.json.implausible-<time>`, never overwritten) and the clock starts afresh where the keeper
resumes; the round rule then catches up over the rounds the live nodes finished. The keeper catches up at
most CATCH_UP rounds a pass, with one listing of the registrations and one write of the clock a pass.

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

from p2pswarm.comm.core import ROUND_CEILING, MonotonicClock, Progress, RoundRule
from p2pswarm.comm.drive.manager import FolderComm
from p2pswarm.comm.drive.store import (MAX_JSON_BYTES, clock_record, is_rollout_file, kept_clock_fields, parse_clock,
                                       round_of, stage_of)
from p2pswarm.components import Coordinator
from p2pswarm.errors import UserError

log = logging.getLogger(__name__)

# How far a clock reading may run ahead of the furthest round a live node says it finished: the keeper moves
# the clock one past a round its quorum finished, and a synced mount may show a registration a round late.
CLOCK_MARGIN = 2
# Rounds one pass of the keeper may advance over (all of them over already), as the DHT keeper's CATCH_UP.
CATCH_UP = 10_000
# No reading at or past this is adopted, whatever registrations claim (they may claim up to 2**31 - 1): a node
# must be able to play, finish and register the rounds after it (34 years of one-second rounds from 0).
MAX_CLOCK = ROUND_CEILING  # the round no clock goes past (comm/core.py)


class FolderCoordinator(Coordinator):
    """A Drive node's round clock: a follower of current_state.json, or (role='coordinator') its keeper.

    `clock` is the round as last accepted or written; it never goes back. A follower accepts a reading of
    the file only when it is plausible (`plausible`); the keeper judges the file it starts with the same way,
    at start_round (when it knows its own checkpoint), and then only writes it. The keeper's `advance()`
    moves the clock over the rounds the round rule says are over (its thread calls it; `step()` moves it by
    one at most); `janitor()` retires old rounds. report_finished(r) puts "I trained r" in this node's
    registration, which is what the keeper's rule counts.
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
        self._lock = threading.RLock()  # the keeper's thread, the round loop and close() all move the clock
        self._pending: dict | None = None  # keeper: the clock file it started with, not judged yet
        self._refusing = False  # an implausible reading was logged, and no plausible one came since
        self.refused = 0  # implausible readings, ignored
        if role == "coordinator":
            raw = self.store.read_json(self.store.state_path())
            state = parse_clock(raw)
            if state is None:
                self._set_aside_unreadable_clock()
                self.write_clock(0)
                log.info("round clock started at round 0 in %s", self.store.base)
            else:
                self._kept = kept_clock_fields(raw)
                if self.plausible(state["round"], self.comm.progress.finished + 1):
                    self._adopt(state)
                else:  # judged again at start_round, with this node's own checkpoint as evidence
                    self._pending = state
            self._thread = threading.Thread(target=self._loop, name="round-clock", daemon=True)
            self._thread.start()
            comm.add_close_callback(self.close)

    @property
    def clock(self) -> int:
        return self.seen.round

    # ---- every node --------------------------------------------------------------------------------------
    def support(self) -> int:
        """The furthest round a live node says it finished: the signed registrations (and, with
        drive_trust_folder, the fork nodes' reward submissions) of the other nodes, banned peers aside;
        -1 when there is none. Never raises."""
        try:
            live = self.comm.live()
            return max((r.finished for r in live.values() if not self.comm.ledger.banned(r.peer_id)), default=-1)
        except Exception as e:  # noqa: BLE001 - a flaky mount: nothing supports a jump this time
            log.debug("reading the registrations: %s: %s", type(e).__name__, e)
            return -1

    def plausible(self, reading: int, own_next: int) -> bool:
        """Whether a clock reading may be adopted: below MAX_CLOCK, and no further than this node gets by
        itself (`own_next`, or the clock it already has) or CLOCK_MARGIN rounds past `support()`. Reads the
        registrations only for a jump."""
        if reading >= MAX_CLOCK:
            return False
        return reading <= max(own_next, self.clock) or reading <= self.support() + CLOCK_MARGIN

    def _refuse(self, reading: int, what: str) -> None:
        """Count an implausible reading; log the first of a run of them (until a plausible one comes)."""
        self.refused += 1
        self.comm.inbox.drops["implausible_clock"] += 1
        if self._refusing:
            log.debug("round clock: round %d in %s ignored again", reading, self.store.state_path())
            return
        self._refusing = True
        why = (f"at or past {MAX_CLOCK}, further than any swarm gets" if reading >= MAX_CLOCK else
               f"more than {CLOCK_MARGIN} round(s) past the furthest round a live node says it finished "
               f"({self.support()}) and past this node's own")
        log.warning("round clock: %s holds round %d, %s (a forged or corrupt file?): %s; further readings like it "
                    "are counted as dropped_implausible_clock", self.store.state_path(), reading, why, what)

    def current(self, own_next: int | None = None) -> int:
        """The clock: as read now, if plausible (never lower than a reading accepted before), or as this
        keeper wrote it. `own_next`: the round this node plays next by itself (default: after its last
        finished round)."""
        if self.role != "coordinator":
            state = self.store.read_clock()
            if state is not None:
                own = self.comm.progress.finished + 1 if own_next is None else own_next
                with self._lock:
                    if self.plausible(state["round"], own):
                        self.seen.see([state["round"]])
                        self._refusing = False
                    else:
                        self._refuse(state["round"], "ignored, this node plays its own next round")
        return max(self.clock, 0)

    def start_round(self, resume_from: int) -> int:
        if self.role == "coordinator":
            with self._lock:
                self._judge_pending(max(resume_from, self.comm.progress.finished + 1))
        return max(resume_from, self.current(max(resume_from, self.comm.progress.finished + 1)))

    def report_finished(self, round: int) -> None:
        self.comm.set_position(finished=round)  # the keeper's rule reads it from our registration

    def next_round(self, finished: int) -> int:
        return max(finished + 1, self.current(max(finished, self.comm.progress.finished) + 1))

    # ---- the keeper ---------------------------------------------------------------------------------------
    def _adopt(self, state: dict) -> None:
        self.seen.see([state["round"]])
        if state["coordinator"] is None:  # no field of ours: the fork's coordinator (or an older one) wrote it
            log.info("round clock adopted at round %d from %s, kept by %s until now; keeping it from here "
                     "in a format its readers still read", self.clock, self.store.state_path(),
                     state["coordinator_name"] or "another coordinator")
        else:
            log.info("round clock resumed at round %d (persisted in %s)", self.clock, self.store.state_path())

    def _judge_pending(self, own_next: int) -> None:
        """The keeper's first clock file, once this node knows where it resumes (`own_next`): adopted if
        plausible; else set aside, and the clock starts afresh where this node resumes, catching up at once
        by the round rule over the rounds the other live nodes finished (this node has played none yet)."""
        state, self._pending = self._pending, None
        if state is None:
            return
        if self.plausible(state["round"], own_next):
            self._adopt(state)
            return
        aside = self._set_aside("implausible")
        self._refuse(state["round"], f"not adopted ({'kept as ' + aside if aside else 'replaced'}); the round clock "
                                     f"starts afresh at round {own_next} and catches up over the rounds the live "
                                     "nodes finished")
        self._kept = {}  # nothing of a file nobody can vouch for is carried over
        self.write_clock(min(max(own_next, 0), MAX_CLOCK - 1))
        self.advance(with_self=False)

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

    def _set_aside(self, why: str) -> str | None:
        """Rename the clock file beside itself (`current_state.json.<why>-<time>`); its new name, or None if
        that failed (then it is simply replaced: the keeper's clock must not wait on a flaky mount)."""
        path = self.store.state_path()
        aside = f"{path}.{why}-{int(time.time())}"
        try:
            self.store.move(path, aside)
        except OSError as e:
            log.debug("could not set %s aside: %s", path, e)
            return None
        return aside

    def _trainers(self, with_self: bool = True) -> dict[str, Progress]:
        """The live registrations and this node itself, from memory (its own file may lag on a synced
        mount); a keeper that has not played yet is at (-1, -1), which the rule neither waits for nor counts
        past round 0."""
        trainers = {n: r.progress for n, r in self.comm.live().items()}
        if with_self:
            trainers[self.comm.node] = self.comm.progress
        return trainers

    def advance(self, limit: int = CATCH_UP, now: float | None = None, *, with_self: bool = True) -> int:
        """Advance the clock over the rounds the round rule says are over, at most `limit` of them, reading
        the registrations once and writing the clock once; how many it moved (0 while the file the keeper
        started with is not judged yet: start_round does that). `with_self=False`: over the rounds the
        others finished, this node aside (a keeper starting afresh, before it plays)."""
        with self._lock:
            if self._pending is not None or self.clock < 0:
                return 0
            trainers = self._trainers(with_self)
            start = round = self.clock
            while round - start < limit and round + 1 < MAX_CLOCK and self.rule.step(round, trainers, now):
                round += 1
            if round == start:
                return 0
            self.write_clock(round)
        done = sum(1 for p in trainers.values() if p.finished >= round - 1)
        if round - start == 1:
            log.info("round clock advanced to round %d (%d of %d live node(s) finished round %d)",
                     round, done, len(trainers), round - 1)
        else:
            log.info("round clock advanced to round %d over %d rounds already over (%d of %d live node(s) finished "
                     "round %d)", round, round - start, done, len(trainers), round - 1)
        return round - start

    def step(self, now: float | None = None) -> bool:
        """Advance the clock by one if the round rule says its round is over; True if it moved. (By hand: a
        clock file not judged yet is judged first, with this node's own progress as its evidence.)"""
        with self._lock:
            if self._pending is not None:
                self._judge_pending(self.comm.progress.finished + 1)
            return self.advance(1, now) == 1

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
                moved = self.advance()  # catch up at once when several rounds are already over (capped)
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
            if self.advance():
                self.janitor()  # as the thread would have: a keeper that played its last rounds fast retires them too
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
