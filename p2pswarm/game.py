"""The round loop of DESIGN.md, read top to bottom in play_round(); resume, checkpoints, pause and stop."""

from __future__ import annotations

import logging
import threading
import time
from statistics import fmean
from typing import Any

from p2pswarm import events as ev
from p2pswarm.errors import UserError
from p2pswarm.components import CommunicationManager, Coordinator, DataManager, RewardManager, Trainer, TrainStats
from p2pswarm.events import EventBus
from p2pswarm.run import RunDir
from p2pswarm.types import GameState, Group

log = logging.getLogger(__name__)
# Checkpoint saves that may fail in a row (a full disk) before the node stops: training on without one keeps
# the swarm going while someone frees space, but not for ever.
MAX_CHECKPOINT_FAILURES = 3


def _mean(groups: list[Group]) -> float | None:
    rewards = [r for g in groups for r in g.rewards]
    return fmean(rewards) if rewards else None


class GameManager:
    """Runs rounds of stages. Subclass and override the hooks (after_rewards, after_round, after_game)."""

    def __init__(
        self,
        *,
        data: DataManager,
        rewards: RewardManager,
        trainer: Trainer,
        comm: CommunicationManager,
        coordinator: Coordinator,
        run: RunDir,
        settings,
        events: EventBus | None = None,
        name: str = "",
    ):
        self.data, self.rewards, self.trainer = data, rewards, trainer
        self.comm, self.coordinator, self.run_dir, self.s = comm, coordinator, run, settings
        self.peer_id = comm.peer_id
        self.name = name or self.peer_id
        self.events = events or EventBus(self.peer_id)
        comm.check_tasks_with(self._task_check())
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self.round = -1
        self.stage = 0
        self.last_checkpoint = -1
        self.checkpoint_failures = 0  # saves that failed in a row (checkpoint)

    def _task_check(self):
        """What a swarm group's task must pass before it reaches the round: re-derived by the DataManager,
        or, when it cannot re-derive, refused unless accept_unverified_tasks says to trust the sender."""
        if self.data.rederivable:
            return self.data.rederive
        if self.s.accept_unverified_tasks:
            log.warning("%s: %s cannot re-derive swarm tasks; accept_unverified_tasks is on, so senders' "
                        "answers are trusted (any peer can poison rewards)", self.name, type(self.data).__name__)
            return lambda task: task
        log.info("%s: %s cannot re-derive swarm tasks: swarm groups are refused (dropped_bad_task); "
                 "set accept_unverified_tasks to trust senders' answers", self.name, type(self.data).__name__)
        return lambda task: None

    # ---- hooks ------------------------------------------------------------------------------------
    def after_rewards(self, state: GameState) -> None:
        """Every group of the round has its rewards; the update has not happened yet."""

    def after_round(self, state: GameState, metrics: dict[str, Any]) -> None:
        """The round is trained and its metrics are written."""

    def after_game(self) -> None:
        """The loop ended (round limit, stop request); the final checkpoint is written."""

    # ---- control (thread-safe; the TUI and signal handlers call these) ---------------------------
    def request_stop(self) -> None:
        self._stop.set()
        self._running.set()
        self.coordinator.interrupt()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def pause(self) -> None:
        self._running.clear()

    def resume_training(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def _progress(self, phase: str, done: int, total: int) -> None:
        self.events.emit(ev.PROGRESS, round=self.round, stage=self.stage, phase=phase, done=done, total=total)

    # ---- the loop ---------------------------------------------------------------------------------
    def restore(self) -> int:
        """Load the last checkpoint; the first round not yet finished."""
        latest = self.run_dir.latest_checkpoint()
        if latest is None:
            self.run_dir.truncate_metrics(-1)
            return 0
        r, path = latest
        self.trainer.load(path)
        dropped = self.run_dir.truncate_metrics(r)
        self.last_checkpoint = r
        self.events.emit(ev.RESUMED, round=r, checkpoint=str(path), metrics_rows_dropped=dropped)
        log.info("%s resumed from %s (round %d done)", self.name, path, r)
        return r + 1

    def checkpoint(self, round: int) -> None:
        """Save a checkpoint of `round`. A save that fails for want of disk space or an I/O error is logged and
        retried at the next checkpoint: the previous checkpoints stay (RunDir.save_checkpoint), and training
        on loses nothing more than stopping would. MAX_CHECKPOINT_FAILURES in a row stop the node."""
        try:
            path = self.run_dir.save_checkpoint(round, self.trainer, keep=self.s.keep_checkpoints,
                                                extra={"peer": self.peer_id})
        except OSError as e:
            self.checkpoint_failures += 1
            if self.checkpoint_failures >= MAX_CHECKPOINT_FAILURES:
                raise
            log.error("%s: the checkpoint of round %d failed (%s); training goes on, the last checkpoint is "
                      "round %d (%d failure(s) in a row, the node stops at %d)", self.name, round, e,
                      self.last_checkpoint, self.checkpoint_failures, MAX_CHECKPOINT_FAILURES)
            self.events.emit(ev.ERROR, message=f"checkpoint of round {round} failed: {e}")
            return
        self.checkpoint_failures = 0
        self.last_checkpoint = round
        self.events.emit(ev.CHECKPOINT_SAVED, round=round, path=str(path))

    def run(self, rounds: int | None = None) -> None:
        """Play until round index `rounds` is reached (a total, so a resumed run plays the rest) or stop."""
        rounds = rounds if rounds is not None else self.s.rounds
        first = self.restore()
        self.events.emit(ev.NODE_STARTED, name=self.name, first_round=first, model=self.s.model)
        r = self.coordinator.start_round(first)
        if r > first:
            self._skipped(first, r - 1)
        last_done = first - 1
        clean = False
        try:
            while not self.stopping and (rounds is None or r < rounds):
                if self.paused:
                    self.events.emit(ev.PAUSED, round=r, paused=True)
                    self.comm.set_paused(True)
                    self._running.wait()
                    self.comm.set_paused(False)
                    self.events.emit(ev.PAUSED, round=r, paused=False)
                    continue
                if self.play_round(r) is None:
                    break
                last_done = r
                self.coordinator.report_finished(r)
                if (r + 1) % self.s.checkpoint_every == 0:
                    self.checkpoint(r)
                if self.stopping or (rounds is not None and r + 1 >= rounds):
                    break  # no next round: do not wait for the swarm's clock to end this one
                nxt = self.coordinator.next_round(r)
                if nxt > r + 1:
                    self._skipped(r + 1, nxt - 1)
                r = nxt
            clean = True
            if not self.stopping and last_done >= 0:
                self.comm.serve_last_round(last_done, self._stop)
        finally:
            # Only a clean exit or a stop request saves: after a crash the model may be mid-update.
            if (clean or self.stopping) and last_done > self.last_checkpoint:
                self.checkpoint(last_done)
            self.after_game()
            self.events.emit(ev.NODE_STOPPED, round=last_done, clean=clean)

    def _skipped(self, first: int, last: int) -> None:
        """Rounds first..last (inclusive) skipped to follow the swarm's clock: one event with the span, never a
        list of the rounds (a clock may jump by millions). The headless printer and the TUI log it."""
        self.events.emit(ev.ROUNDS_SKIPPED, first=first, last=last, count=last - first + 1)

    def play_round(self, r: int) -> dict[str, Any] | None:
        """One round; None if a stop request abandoned it (nothing was trained)."""
        self.round = r
        t0 = time.perf_counter()
        self.events.emit(ev.ROUND_STARTED, round=r)
        state = GameState(r)
        tasks = self.data.round_tasks(r)
        gen_seconds = gen_tokens = 0.0
        for stage in range(self.data.num_stages):
            if self.stopping:
                return None
            self.stage = stage
            if stage > 0:
                tasks = self.data.stage_tasks(state, stage)
            for t in tasks:
                t.stage = stage
            self.data.with_prompts(tasks)
            local = self.trainer.generate(tasks, progress=self._progress) if tasks else []
            gen = self.trainer.last_generate if tasks else {}
            gen_seconds += gen.get("seconds", 0.0)
            gen_tokens += gen.get("tokens", 0)
            for g in local:
                g.peer = self.peer_id
            self.rewards.score(local)
            state.add(stage, local, [])
            for s in self.stages_to_exchange(stage):
                self._exchange(state, s)
        self.after_rewards(state)
        if self.stopping:
            return None
        t_train = time.perf_counter()
        stats = self.trainer.train(state, progress=self._progress)
        metrics = self._metrics(state, stats, gen_seconds, gen_tokens, time.perf_counter() - t_train, t0)
        if self.s.eval_every and (r + 1) % self.s.eval_every == 0:
            tasks = self.data.with_prompts(self.data.eval_tasks())
            figures = self.trainer.evaluate(tasks, self.rewards.reward) if tasks else {}
            if figures:
                metrics.update(figures)
                self.events.emit(ev.EVALUATED, round=r, **{k: v for k, v in metrics.items() if k.startswith("eval_")})
        self.run_dir.append_metrics(metrics)
        self.events.emit(ev.ROUND_FINISHED, **metrics)
        self.after_round(state, metrics)
        return metrics

    def stages_to_exchange(self, stage: int) -> list[int]:
        """Stages whose groups are exchanged once `stage` is generated: that stage, or with
        publish_frequency=round nothing until the last stage and then all of them (the later stages then
        play on local rollouts only: fewest Drive API calls)."""
        if self.s.publish_frequency != "round":
            return [stage]
        return list(range(stage + 1)) if stage == self.data.num_stages - 1 else []

    def _exchange(self, state: GameState, stage: int) -> None:
        """Publish this stage's local groups, collect the swarm's, score them."""
        r, local = state.round, state.local.get(stage, [])
        self.comm.publish(r, stage, local)
        swarm = self.comm.collect(r, stage)
        self.data.with_prompts([g.task for g in swarm])
        self.rewards.score(swarm)  # against the receiver's own copy of each task; the sender's rewards are ignored
        state.add(stage, [], swarm)
        self.events.emit(
            ev.ROLLOUTS_RECEIVED, round=r, stage=stage, groups=len(swarm), peers=sorted({g.peer for g in swarm}),
            peer_rewards=ev.peer_rewards(swarm),
        )
        self.events.emit(ev.ROLLOUTS, round=r, stage=stage, **ev.rollout_sample(local, swarm))

    def _metrics(self, state: GameState, stats: TrainStats, gen_s: float, gen_tok: float, train_s: float, t0: float) -> dict[str, Any]:
        local, swarm = state.local_groups(), state.swarm_groups()
        return {
            "round": state.round,
            "peer": self.peer_id,
            "node": self.name,
            "time": round(time.time(), 3),
            "reward_mean": _mean(local + swarm),
            "reward_local_mean": _mean(local),
            "reward_swarm_mean": _mean(swarm),
            "local_groups": stats.local_groups,
            "swarm_groups": stats.swarm_groups,
            "swarm_peers": stats.swarm_peers,
            "swarm_groups_received": len(swarm),
            "signal_fraction": sum(g.has_signal for g in local) / max(len(local), 1),
            "loss": stats.loss,
            "kl": stats.kl,
            "clip_fraction": stats.clip_fraction,
            "skipped_update": stats.skipped,
            "gen_tokens_per_s": gen_tok / gen_s if gen_s else 0.0,
            "gen_seconds": gen_s,
            "train_seconds": train_s,
            "round_seconds": time.perf_counter() - t0,
            "comm": self.comm.counters(),
        }


class LockstepGameManager(GameManager):
    """A GameManager for peers that run in lockstep (--comm torch: every exchange is a collective).

    A stop request (signal, UI) is held until the next round boundary, where the coordinator shares it
    (Coordinator.bind_stop) so that every peer stops after the same round: a peer that left mid-round
    would leave the others waiting in a collective. Pausing one peer would stall all of them, so pause
    is refused. A crash is reported to the others through comm.note_exit, so they name it instead of
    timing out."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._stop_wanted = threading.Event()
        self.coordinator.bind_stop(self._stop_wanted.is_set, super().request_stop)

    def request_stop(self) -> None:
        self._stop_wanted.set()

    def pause(self) -> None:
        log.warning("%s: pause is not available with --comm torch (ranks run in lockstep)", self.name)

    def run(self, rounds: int | None = None) -> None:
        try:
            super().run(rounds)
        except BaseException as e:
            if not isinstance(e, UserError):  # a UserError is the transport's own one-line verdict
                first = (str(e).strip().splitlines() or [""])[0][:300]
                self.comm.note_exit(f"failed: {type(e).__name__}: {first}")
            raise
