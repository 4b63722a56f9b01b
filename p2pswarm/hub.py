"""Pushing the trained policy to the Hugging Face Hub, as RL Swarm and its Drive fork do.

With a token (HUGGINGFACE_ACCESS_TOKEN, as RL Swarm users know it; or `hub_repo` set and HF_TOKEN / a
saved `hf auth login`), a node uploads its checkpoint's `model/` folder (a save_pretrained folder: weights,
config, tokenizer) every `hub_push_every` rounds, at the first checkpoint after each multiple, to
`<token's user>/<model>-Gensyn-Swarm-<node name>` (RL Swarm's name for it; `hub_repo` overrides), and its
last checkpoint once more when it stops cleanly.

Nothing here runs on the round thread but a hard-linked copy of the checkpoint (so that pruning it does not
pull the files from under an upload): one background thread uploads. A push still running when the next one
is due makes that one skipped, not queued; only the last checkpoint waits for it, at a stop, for at most
FINAL_PUSH_WAIT seconds. A hub that cannot be reached or refuses is one warning line, at the first failure
(later ones are logged at debug level until a push succeeds again), and training goes on. The token is
handed to huggingface_hub per call: it is never logged and never written to disk (no `login`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from pathlib import Path

from p2pswarm import events as ev
from p2pswarm.run import RunDir
from p2pswarm.settings import Settings

log = logging.getLogger(__name__)

FINAL_PUSH_WAIT = 600.0  # seconds a stopping node waits for its last push (a 0.5B model on a slow uplink)


def hub_push_enabled(settings: Settings) -> bool:
    return settings.hub_push_every > 0 and (settings.hub_token is not None or settings.hub_repo is not None)


def default_repo_name(model: str, node: str) -> str:
    """RL Swarm's `<model basename>-Gensyn-Swarm-<agent name>`, in the characters the Hub accepts."""
    base = model.rstrip("/").replace("\\", "/").split("/")[-1] or "model"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-Gensyn-Swarm-{node}")
    name = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", name))
    return name[:96].strip("-._") or "p2pswarm-policy"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links (some FUSE mounts)
        shutil.copy2(src, dst)


class HubPusher:
    """Listens to a node's events and pushes its checkpoints to the Hub (see the module doc)."""

    def __init__(self, run: RunDir, settings: Settings, node: str):
        self.every, self.node, self.model = settings.hub_push_every, node, settings.model
        self._token = settings.hub_token.get_secret_value() if settings.hub_token is not None else None
        self._repo = settings.hub_repo
        self._staging = run.path / ".hub-push"
        self._cond = threading.Condition()
        self._pending: list[tuple[int, Path]] = []
        self._busy = False
        self._closing = False
        self._due = 0  # multiples of `every` rounds already pushed or skipped
        self._latest: tuple[int, Path] | None = None  # the last checkpoint saved
        self._sent = -1  # round of the last checkpoint handed to the thread
        self._failing = False
        # huggingface_hub warns on each retry of a request: more lines than our one warning for a failure.
        logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._loop, name=f"hub-push-{node}", daemon=True)
        self._thread.start()

    # ---- events (on the game thread: stage the files, note the work) --------------------------------------
    def __call__(self, event: ev.Event) -> None:
        if event.kind == ev.CHECKPOINT_SAVED and event.data.get("path"):
            r = int(event.data["round"])
            self._latest = (r, Path(event.data["path"]))
            k = (r + 1) // self.every
            if k <= self._due:
                return
            self._due = k
            with self._cond:
                busy = self._busy or bool(self._pending)
            if busy:
                log.info("%s: the Hugging Face Hub push of round %d is still running: round %d is not pushed",
                         self.node, self._sent, r)
                return
            self._queue(r, Path(event.data["path"]))
        elif event.kind == ev.NODE_STOPPED:
            if self._latest is not None and self._latest[0] != self._sent:
                log.info("%s: pushing the last checkpoint (round %d) to the Hugging Face Hub", self.node, self._latest[0])
                self._queue(*self._latest)
            self.close()

    def _queue(self, round: int, checkpoint: Path) -> None:
        staged = self._staging / f"round_{round:06d}"
        try:
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(checkpoint / "model", staged, copy_function=_link_or_copy)
        except OSError as e:
            self._failed(f"could not stage {checkpoint / 'model'}: {e}")
            return
        self._sent = round
        with self._cond:
            self._pending.append((round, staged))
            self._cond.notify()

    # ---- the upload thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                round, folder = self._pending.pop(0)
                self._busy = True
            try:
                self._push(round, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _push(self, round: int, folder: Path) -> None:
        try:
            from huggingface_hub import HfApi

            api = HfApi(token=self._token)  # None: HF_TOKEN or the saved login
            repo = self._repo or default_repo_name(self.model, self.node)
            if "/" not in repo:
                repo = f"{api.whoami()['name']}/{repo}"
                self._repo = repo  # one whoami per run: the Hub rate-limits it
            api.create_repo(repo, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(folder),
                              commit_message=f"p2pswarm: round {round}, node {self.node}")
        except Exception as e:  # noqa: BLE001 - an unreachable or refusing hub must never stop training
            self._failed(f"{type(e).__name__}: {e}")
            return
        if self._failing:
            log.info("%s: pushing to the Hugging Face Hub works again", self.node)
            self._failing = False
        log.info("%s: pushed the policy of round %d to the Hugging Face Hub as %s", self.node, round, repo)

    def _failed(self, why: str) -> None:
        if self._token:
            why = why.replace(self._token, "***")
        why = (why.strip().splitlines() or [""])[0][:300]
        if self._failing:
            log.debug("%s: Hugging Face Hub push failed again: %s", self.node, why)
            return
        self._failing = True
        log.warning("%s: could not push the policy to the Hugging Face Hub (%s); training goes on, and later "
                    "failures are logged at debug level only", self.node, why)

    def close(self, timeout: float = FINAL_PUSH_WAIT) -> None:
        """Finish what is queued (the last checkpoint above all), waiting at most `timeout` seconds."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.info("%s: left the Hugging Face Hub push unfinished after %.0f s", self.node, timeout)
        else:
            shutil.rmtree(self._staging, ignore_errors=True)


def attach_hub_push(settings: Settings, run: RunDir, events: ev.EventBus, node: str) -> HubPusher | None:
    """A HubPusher listening to `events` if the settings ask for pushes; it finishes when the node stops."""
    if not hub_push_enabled(settings):
        return None
    pusher = HubPusher(run, settings, node)
    events.subscribe(pusher)
    log.info("%s: pushing the policy to the Hugging Face Hub every %d rounds%s", node, settings.hub_push_every,
             f" as {settings.hub_repo}" if settings.hub_repo else "")
    return pusher
