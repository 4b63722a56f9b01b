"""GRPO with SAPO mixing on any transformers causal LM.

generate(): one batched decoding call per stage for all prompts x G (p2pswarm/decoding.py: our static-KV-cache
            loop, or HF `generate` for a model it can't drive; left padding).
train():    pick I local + J swarm groups (selection.Selector: flat groups dropped), compute old
            log-probs once, then `num_iterations` clipped-surrogate steps (AdamW, grad clipping).
Swarm completions are text: they are re-tokenised with the local tokenizer under the local prompt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from p2pswarm import grpo
from p2pswarm.components import Trainer, TrainStats
from p2pswarm.decoding import Decoder
from p2pswarm.errors import UserError
from p2pswarm.fastlm import FusedLM
from p2pswarm.rewards import extract_answer
from p2pswarm.selection import Selector
from p2pswarm.types import GameState, Group, Task

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class GRPOTrainer(Trainer):
    def __init__(self, model, tokenizer, settings, device: torch.device | None = None):
        self.model = model
        self.tok = tokenizer
        self.s = settings
        self.device = device or next(model.parameters()).device
        self.rng = random.Random(settings.seed)
        self.selector = Selector(settings, self.rng)
        gen_eos = model.generation_config.eos_token_id
        eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("the model has no eos token; set generation_config.eos_token_id")
        self.eos_ids = eos
        self.end_id = eos[0]  # appended to re-tokenised swarm completions that ended on their own
        max_pos = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.max_prompt_tokens = max(8, min(settings.max_prompt_tokens, max_pos - settings.max_new_tokens))
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        params = [p for p in model.parameters() if p.requires_grad]
        opts = dict(lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, settings.adam_beta2))
        # torch's fused AdamW (one kernel over all tensors): 8x the per-tensor loop's speed on a 0.5B model on
        # the CPU (bench/README.md); the same update and state_dict. Devices without it take the loop.
        fused_ok = {p.device.type for p in params} <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
        self.optimizer = torch.optim.AdamW(params, fused=fused_ok or None, **opts)
        self.ref_model = None
        if settings.beta > 0:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.last_generate: dict[str, float] = {}
        self.decoder = Decoder(model, self.eos_ids, tokenizer.pad_token_id, choice=settings.decoder,
                               compile=settings.decoder_compile, fused=settings.fused_forward == "auto")
        # the training forward too, unless gradient checkpointing asks for HF's per-layer recomputation
        self.fused = None
        why_not = "fused_forward=off" if settings.fused_forward == "off" else FusedLM.supports(model)
        if why_not is None and settings.gradient_checkpointing:
            why_not = "gradient checkpointing"
        if why_not is None:
            self.fused = FusedLM(model)
        log.info("policy forward: decoding on %s, training on %s", self.decoder.path,
                 "p2pswarm's fused forward" if self.fused else f"transformers' ({why_not})")

    # ---- prompts -------------------------------------------------------------------------------
    def _render(self, task: Task) -> str:
        if task.prompt is None:
            raise ValueError(f"task {task.task_id} has no prompt; the DataManager builds it")
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(task.prompt, add_generation_prompt=True, tokenize=False)
        # A base model (GPT-2 and the like) has no chat template: plain text turns.
        return "".join(f"{m['content']}\n\n" for m in task.prompt)

    def _encode_prompts(self, tasks: list[Task]) -> dict[str, torch.Tensor]:
        return self.tok(
            [self._render(t) for t in tasks],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            truncation=True,
            truncation_side="left",
            max_length=self.max_prompt_tokens,
            add_special_tokens=False,
        ).to(self.device)

    def _prompt_ids(self, task: Task) -> list[int]:
        ids = self.tok(self._render(task), add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens :]

    def _completion_ids(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.s.max_new_tokens:
            return ids[: self.s.max_new_tokens]  # the sender ran out of tokens too: no eos
        return ids + [self.end_id]

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, tasks: list[Task], n: int, greedy: bool, progress: Progress | None) -> list[list[list[int]]]:
        """Completion token ids per task (n per task), each cut after its first eos (kept)."""
        enc = self._encode_prompts(tasks)
        self.model.eval()
        on_step = None if progress is None else (lambda done, total: progress("generate", done, total))
        # generation_config.min_new_tokens is honoured, as generate did (the trainer-speed bench sets it)
        min_new = getattr(self.model.generation_config, "min_new_tokens", None) or 0
        gen = self.decoder.generate(
            enc["input_ids"], enc["attention_mask"], n=n, max_new_tokens=self.s.max_new_tokens,
            min_new_tokens=min(min_new, self.s.max_new_tokens), greedy=greedy, temperature=self.s.temperature,
            top_p=self.s.top_p, progress=on_step,
        ).tolist()
        eos = set(self.eos_ids)
        result: list[list[list[int]]] = []
        for i in range(len(tasks)):
            per_task = []
            for row in gen[i * n : (i + 1) * n]:
                cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                per_task.append(row[:cut])
            result.append(per_task)
        return result

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)

    def generate(self, tasks: list[Task], progress: Progress | None = None) -> list[Group]:
        t0 = time.perf_counter()
        G = self.s.num_generations
        sampled = self._sample(tasks, G, greedy=False, progress=progress)
        groups = [
            Group(task=t, completions=[self._decode(c) for c in ids], peer="", completion_ids=ids)
            for t, ids in zip(tasks, sampled)
        ]
        seconds = time.perf_counter() - t0
        tokens = sum(len(c) for ids in sampled for c in ids)
        self.last_generate = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}
        return groups

    def evaluate(self, tasks: list[Task], score: Callable[[Task, str], float], batch: int = 64) -> dict[str, float]:
        """Greedy accuracy on held-out tasks: the mean, one figure per dataset, and the share of answers in an
        <answer> block (`eval_answer_tagged`: a policy that answers in words scores 0 however right it is)."""
        per: dict[str, list[float]] = defaultdict(list)
        tagged = 0
        for i in range(0, len(tasks), batch):
            chunk = tasks[i : i + batch]
            for t, ids in zip(chunk, self._sample(chunk, 1, greedy=True, progress=None)):
                text = self._decode(ids[0])
                per[t.dataset].append(score(t, text))
                tagged += extract_answer(text) is not None
        scores = [x for v in per.values() for x in v]
        out = {"eval_reward": sum(scores) / max(len(scores), 1), "eval_answer_tagged": tagged / max(len(scores), 1)}
        out.update({f"eval_{k}": sum(v) / len(v) for k, v in sorted(per.items())})
        return out

    # ---- training ------------------------------------------------------------------------------
    def select(self, state: GameState) -> tuple[list[Group], list[Group]]:
        """SAPO sampling: I local and J swarm groups, by the `selection` protocol and `split` (Selector)."""
        return self.selector.select(state)

    def _batch(self, groups: list[Group]) -> dict[str, torch.Tensor]:
        """Left-padded prompts then right-padded completions, so every completion starts at the same column and
        the forward keeps logits only for completion positions (not for the prompts' tails); mask marks the
        completion targets; advantage per row."""
        rows: list[tuple[list[int], list[int]]] = []
        advantages: list[torch.Tensor] = []
        group: list[int] = []  # row -> its group, whose rows share one prompt
        first_row: list[int] = []
        scale = self.s.loss_type != "dr_grpo"
        for gi, g in enumerate(groups):
            prompt = self._prompt_ids(g.task)
            completions = g.completion_ids if g.completion_ids is not None else [self._completion_ids(c) for c in g.completions]
            advantages.append(grpo.group_advantages(torch.tensor(g.rewards, dtype=torch.float32), scale=scale))
            first_row.append(len(rows))
            rows.extend((prompt, c) for c in completions)
            group.extend([gi] * len(completions))
        P = max(len(p) for p, _ in rows)
        C = max(len(c) for _, c in rows)
        pad = self.tok.pad_token_id
        ids = torch.full((len(rows), P + C), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), P + C), dtype=torch.long)
        target_mask = torch.zeros((len(rows), C), dtype=torch.float32)
        for i, (p, c) in enumerate(rows):
            ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c)
            attn[i, P - len(p) : P + len(c)] = 1
            target_mask[i, : len(c)] = 1
        return {
            "input_ids": ids,
            "attention_mask": attn,
            "mask": target_mask,
            "keep": C + 1,  # logits at P-1 .. P+C-1: the last one predicts nothing and is dropped
            "advantages": torch.cat(advantages),
            "group": torch.tensor(group),
            "first_row": torch.tensor(first_row),
        }

    def _logprobs(self, model, b: dict[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
        """(rows, C) log-probs of the completion targets of batch b's rows, at the sampling temperature.
        Positions count real tokens only (each row's first real token at 0), as in left-padded generation.
        Through FusedLM each group's prompt is computed once for all its rows in this slice."""
        ids, attn = b["input_ids"][rows].to(self.device), b["attention_mask"][rows].to(self.device)
        P = ids.shape[1] - b["keep"] + 1
        if self.fused is not None and model is self.model:
            groups, owner = torch.unique(b["group"][rows], return_inverse=True)
            first = b["first_row"][groups]
            logits = self.fused.forward_shared(b["input_ids"][first, :P].to(self.device),
                                               b["attention_mask"][first, :P].to(self.device), ids[:, P:],
                                               owner.to(self.device))
        else:
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=b["keep"],
                           use_cache=False).logits[:, :-1]
        return grpo.sequence_logprobs(logits / self.s.temperature, ids[:, P:])

    def train(self, state: GameState, progress: Progress | None = None) -> TrainStats:
        local, swarm = self.select(state)
        stats = TrainStats(
            local_groups=len(local), swarm_groups=len(swarm), swarm_peers=len({g.peer for g in swarm})
        )
        if not local and not swarm:
            stats.skipped = True
            return stats
        b = self._batch(local + swarm)
        B = b["input_ids"].shape[0]
        mb = max(1, self.s.micro_batch_size)
        chunks = [slice(i, i + mb) for i in range(0, B, mb)]
        dev = lambda t: t.to(self.device)  # noqa: E731
        totals = dict(
            total_sequences=B,
            total_tokens=int(b["mask"].sum()),
            max_completion_length=self.s.max_new_tokens,
        )
        steps_total = self.s.num_iterations * len(chunks)
        old: list[torch.Tensor | None] = [None] * len(chunks)
        ref: list[torch.Tensor | None] = [None] * len(chunks)
        with torch.no_grad():
            for k, sl in enumerate(chunks):
                if self.s.num_iterations > 1:
                    self.model.eval()
                    old[k] = self._logprobs(self.model, b, sl)
                if self.ref_model is not None:
                    ref[k] = self._logprobs(self.ref_model, b, sl)
        self.model.train()
        losses, kls, clips = [], [], []
        step = 0
        for _ in range(self.s.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            it_loss = it_kl = it_clip = 0.0
            for k, sl in enumerate(chunks):
                mask, adv = dev(b["mask"][sl]), dev(b["advantages"][sl])
                logp = self._logprobs(self.model, b, sl)
                old_k = old[k] if old[k] is not None else logp.detach()
                per_tok, kl, clipped = grpo.token_losses(
                    logp, old_k, adv, self.s.epsilon, self.s.epsilon_high, ref[k], self.s.beta
                )
                loss = grpo.aggregate(per_tok, mask, self.s.loss_type, **totals)
                loss.backward()
                n_tok = max(totals["total_tokens"], 1)
                it_loss += loss.item()
                it_kl += float((kl * mask).sum()) / n_tok
                it_clip += float((clipped * mask).sum()) / n_tok
                step += 1
                if progress is not None:
                    progress("train", step, steps_total)
            if self.s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.max_grad_norm)
            self.optimizer.step()
            losses.append(it_loss)
            kls.append(it_kl)
            clips.append(it_clip)
        self.model.eval()
        stats.loss = sum(losses) / len(losses)
        stats.kl = sum(kls) / len(kls)
        stats.clip_fraction = sum(clips) / len(clips)
        return stats

    # ---- persistence ---------------------------------------------------------------------------
    # A checkpoint is data only: the model as safetensors (save_pretrained), the tokenizer as JSON, and
    # trainer.pt with the optimizer state and RNG states, which are tensors, numbers and tuples: torch.load
    # reads it with weights_only=True, which refuses any pickle that would import or call something. So a
    # checkpoint planted in the run folder (or a shared one) cannot run code. checksums.json (sha256 of
    # every file above) makes a corrupted or altered file an error instead of silently wrong weights.
    # Checkpoints of earlier versions (no checksums.json, the same trainer.pt keys) still load.
    def save(self, path: Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path / "model")  # safetensors (transformers' default)
        self.tok.save_pretrained(path / "model")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.getstate(),  # (int, tuple of 625 ints, float | None)
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(state, path / "trainer.pt")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKSUMS)
        sums = {p.relative_to(path).as_posix(): _sha256(p) for p in files}
        (path / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1))

    def load(self, path: Path) -> None:
        """Restore weights, optimizer and RNG states; CheckpointError (one line) for a checkpoint that is
        altered, corrupted, or holds anything but data."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        verify_checkpoint(path)
        try:
            saved = AutoModelForCausalLM.from_pretrained(path / "model", dtype=next(self.model.parameters()).dtype,
                                                         use_safetensors=True)  # never a pickled .bin
            self.model.load_state_dict(saved.state_dict())
        except Exception as e:  # noqa: BLE001 - whatever the files hold, one line
            raise CheckpointError(path, f"its model does not load ({type(e).__name__}: {first_line(e)})") from None
        try:
            state = torch.load(path / "trainer.pt", map_location=self.device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError (code in it), RuntimeError (not a torch file)...
            raise CheckpointError(path, "trainer.pt is not a plain tensor file: it may hold code, which is never "
                                  f"run ({type(e).__name__}: {first_line(e)})") from None
        try:
            if not isinstance(state, dict):
                raise ValueError("trainer.pt is not a dict")
            rng = _rng_state(state.get("rng"))
            self.optimizer.load_state_dict(state["optimizer"])
            self.rng.setstate(rng)
            torch.set_rng_state(state["torch_rng"].cpu())
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(path, f"trainer.pt does not hold this trainer's state ({type(e).__name__}: "
                                  f"{first_line(e)})") from None


CHECKSUMS = "checksums.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint that must not be loaded; the message is one line naming it and why."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"refusing the checkpoint {path}: {why}. Move that folder away to resume from an "
                         "earlier checkpoint, or from scratch")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Check every file against checksums.json (CheckpointError on a mismatch or a missing file). A
    checkpoint without checksums.json (an earlier version's) is taken as it is: its trainer.pt still loads
    only as data."""
    sums_path = Path(path) / CHECKSUMS
    if not sums_path.exists():
        log.info("%s has no %s (written by an earlier version): loading it unverified, as data only", path, CHECKSUMS)
        return
    try:
        sums = json.loads(sums_path.read_text())["sha256"]
        if not isinstance(sums, dict) or "trainer.pt" not in sums:
            raise ValueError("no trainer.pt in it")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(path, f"{CHECKSUMS} is unreadable ({type(e).__name__}: {first_line(e)})") from None
    for rel, digest in sums.items():
        f = Path(path) / rel
        if ".." in Path(rel).parts or not f.is_file():
            raise CheckpointError(path, f"{rel} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(path, f"{rel} does not match its checksum (altered or corrupted)")


def _rng_state(v: Any) -> tuple:
    """random.Random's state (version, 625 words, gauss_next) from trainer.pt, checked."""
    if not (isinstance(v, (tuple, list)) and len(v) == 3 and type(v[0]) is int and isinstance(v[1], (tuple, list))
            and len(v[1]) == 625 and all(type(x) is int and 0 <= x < 2**32 for x in v[1])
            and (v[2] is None or type(v[2]) is float)):
        raise ValueError("the random state is malformed")
    return v[0], tuple(v[1]), v[2]
