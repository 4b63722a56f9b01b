"""Our own decoding loop for causal LMs: a preallocated KV cache, sampling on the device, optionally compiled.

Issue #17 found HF `generate`'s per-token loop (logits processors, stopping criteria, cache bookkeeping, a host
sync per token) costing as much as the model's forward on the CPU. Decoder.generate() runs the model's forward
(FusedLM's where it can, else HF's with a transformers StaticCache) and does everything else in a few tensor
ops per step that never wait on the device; whether a row has finished is read back to the host only every
`sync_every` tokens on an accelerator (every token on the CPU, where it costs nothing), to stop early once
every row has.

Sampling matches HF's `do_sample=True, top_k=0`: min_new_tokens masks eos first, then temperature, then top-p
(the smallest set of tokens whose probability reaches top_p; at least one kept), then one draw per row. On an
accelerator the draw is the exponential-race form of a categorical sample (argmax of p / E, E ~ Exp(1)): no host
synchronisation, fit for CUDA graphs. On the CPU it is an inverse-CDF draw (one uniform number a row, not one a
token) with top-p taken among the 64 most likely tokens when they hold top_p (else a full sort): the same
distribution, 5-25x cheaper there (bench/README.md).

Where the model allows it (p2pswarm/fastlm.py: Qwen2, Llama, Mistral) an eager loop runs FusedLM instead of
HF's forward: each prompt is prefilled once for its n samples, and a decoding step is ~60 compute ops, not ~390.

The model's generation_config sampling extras (repetition_penalty, top_k, ...) are not applied: the loop samples
the policy's own distribution at the trainer's temperature and top-p, the one training's log-probs are taken
under. HF `generate` (the fallback) is called with top_k=0 for the same reason.

Positions are those HF `generate` gives a left-padded batch (each row's first real token at position 0), so
the log-probs of the training forward (trainer._logprobs) are the sampling distribution's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

from p2pswarm.fastlm import FusedLM, padding_bias

log = logging.getLogger(__name__)

DecoderChoice = Literal["auto", "ours", "hf"]
CompileChoice = Literal["auto", "on", "off"]
Draw = Literal["race", "cdf"]
TOP_P_FIRST = 64  # top-p looks among this many most likely tokens first (a full sort only when they fall short)
LENGTH_BUCKET = 32  # prompt lengths are left-padded up to a multiple of this, so compiled shapes repeat


class DecoderUnsupported(RuntimeError):
    """The model cannot run in our loop (no static cache, an encoder-decoder, a forward that refuses it)."""


def unsupported_reason(model) -> str | None:
    """Why our loop cannot drive this model, or None when it can (checked before the first call)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return "it is not a decoder-only transformers model"
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not declare static-cache support (_can_compile_fullgraph)"
    text_cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    if "sliding_attention" in (getattr(text_cfg, "layer_types", None) or []) or (
            getattr(text_cfg, "sliding_window", None) and getattr(text_cfg, "use_sliding_window", True)):
        return "sliding-window attention layers (a static cache sizes them apart; not checked with our loop)"
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager", None):
        return f"attention implementation {cfg._attn_implementation!r} is not one our loop has been checked with"
    return None


def sample_next(logits: torch.Tensor, step: torch.Tensor, eos: torch.Tensor, *, greedy: bool, temperature: float,
                top_p: float, min_new_tokens: int, draw: Draw = "race") -> tuple[torch.Tensor, torch.Tensor]:
    """(next token per row, its log-prob under softmax(logits / temperature)) from (B, V) float logits.

    `step` is the index of the token being chosen (a 0-d tensor, so a compiled step does not recompile).
    `draw`: "race" = argmax(p / E), E ~ Exp(1) per token (no data-dependent indexing, fit for CUDA graphs);
    "cdf" = the first token whose cumulative probability exceeds u * total, u ~ U[0, 1) per row: one random
    number a row instead of one a token, which on the CPU is most of the draw's cost (~20 ns a number)."""
    if min_new_tokens > 0:
        logits = torch.where((step < min_new_tokens) & _eos_columns(logits, eos), float("-inf"), logits)
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if greedy:
        nxt = logits.argmax(-1)
    else:
        probs = logp.exp()
        if draw == "cdf":
            nxt = _draw_cdf(probs, top_p)
        else:
            if top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1)  # ascending, as HF's TopPLogitsWarper
                drop_sorted = sorted_p.cumsum(-1) <= 1 - top_p
                drop_sorted[:, -1] = False  # the most likely token always stays
                drop = drop_sorted.scatter(-1, order, drop_sorted)
                probs = probs.masked_fill(drop, 0.0)
            race = torch.empty_like(probs).exponential_()
            nxt = (probs / race).argmax(-1)
    return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)


def _draw_cdf(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """One token per row by inverse CDF. Top-p looks among the TOP_P_FIRST most likely tokens when they hold
    top_p of every row's mass (a bool read back: free on the CPU, where this draw is used), else sorts all;
    HF's rule either way: a token stays iff the tokens above it hold < top_p."""
    idx = None
    if top_p < 1.0:
        top, idx = probs.topk(min(TOP_P_FIRST, probs.shape[-1]), dim=-1)  # descending
        if top.shape[-1] < probs.shape[-1] and not bool((top.sum(-1) >= top_p).all()):
            top, idx = probs.sort(dim=-1, descending=True)
        probs = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    # right=True: a token of probability 0 (top-p, min_new_tokens) never matches, its cdf equals the one before
    j = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    return (j if idx is None else idx.gather(-1, j)).squeeze(1)


def _eos_columns(logits: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    cols = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return cols.index_fill(0, eos, True)


class Decoder:
    """Batched sampling from a causal LM with a static KV cache; HF `generate` for a model it can't handle.

    generate(input_ids, attention_mask, ...) takes left-padded prompts (as the tokenizer returns them with
    padding_side="left") and returns the new tokens, (rows x n, T) with T <= max_new_tokens, rows repeated n
    times in place (row i's samples at i*n .. i*n+n-1, like num_return_sequences); after a row's first eos
    every token is `pad_id`. With return_logprobs, also the (rows x n, T) log-probs of each chosen token under
    softmax(logits / temperature) (before top-p), 0 after eos.

    choice: "auto" (our loop where it can, else HF generate, said once in the log), "ours" (our loop; a model
    it can't handle raises DecoderUnsupported), "hf" (always HF generate).
    compile: "on" compiles the per-token step with torch.compile (CUDA graphs on CUDA), once per shape;
    "auto" does so on CUDA only (on CPU inductor did not pay on the models measured, bench/README.md);
    "off" never. A compile that fails is logged once and the step runs eagerly.
    """

    def __init__(self, model, eos_ids: list[int], pad_id: int, choice: DecoderChoice = "auto",
                 compile: CompileChoice = "auto", sync_every: int | None = None, fused: bool = True,
                 draw: Draw | None = None):
        self.model = model
        self.eos_ids = list(eos_ids)
        self.pad_id = int(pad_id)
        self.choice = choice
        self.reason = None if choice == "hf" else unsupported_reason(model)
        if self.reason is not None:
            if choice == "ours":
                raise DecoderUnsupported(f"decoder 'ours' cannot drive this model: {self.reason}")
            log.info("decoding with HF generate: our loop cannot drive this model (%s)", self.reason)
        device = next(model.parameters()).device
        self.compile = compile == "on" or (compile == "auto" and device.type == "cuda")
        # Reading `finished` back costs a device sync on an accelerator, nothing on the CPU, where stopping at
        # the first step every row has ended saves whole forwards (the embedded policy answers in ~5 tokens).
        self.sync_every = max(1, sync_every or (1 if device.type == "cpu" else 8))
        self.draw: Draw = draw or ("cdf" if device.type == "cpu" else "race")
        # An eager step runs the model through FusedLM where it can (a few ops a layer instead of HF's ~90); a
        # compiled step keeps HF's forward and StaticCache, whose shapes never change between steps.
        self.fused = FusedLM(model) if fused and not self.compile and FusedLM.supports(model) is None else None
        self._step_fn: Callable | None = None
        self._caches: dict[tuple, Any] = {}  # (rows, length, device) -> StaticCache, when compiled
        self.last: dict[str, float] = {}

    @property
    def path(self) -> str:
        """Which forward samples: 'fused' (FusedLM), 'static-cache' (HF's forward in our loop) or 'hf-generate'."""
        return "hf-generate" if self.uses_hf else "fused" if self.fused is not None else "static-cache"

    @property
    def uses_hf(self) -> bool:
        return self.choice == "hf" or self.reason is not None

    # ---- the loop ------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, n: int = 1, max_new_tokens: int,
                 min_new_tokens: int = 0, greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 return_logprobs: bool = False, progress: Callable[[int, int], None] | None = None):
        # inference mode: no autograd bookkeeping per op, ~17% of the embedded policy's decoding time on the CPU
        with torch.inference_mode():
            out = self._generate(input_ids, attention_mask, n, max_new_tokens, min_new_tokens, greedy, temperature,
                                 top_p, return_logprobs, progress)
        # ordinary tensors again (a few KB), which a caller may use in autograd
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    def _generate(self, input_ids, attention_mask, n, max_new_tokens, min_new_tokens, greedy, temperature, top_p,
                  return_logprobs, progress):
        if not self.uses_hf:
            try:
                return self._ours(input_ids, attention_mask, n, max_new_tokens, min_new_tokens, greedy,
                                  temperature, top_p, return_logprobs, progress)
            except DecoderUnsupported as e:
                if self.choice == "ours":
                    raise
                self.reason = str(e)
                log.warning("decoding with HF generate from now on: our loop failed on this model (%s)", e)
        return self._hf(input_ids, attention_mask, n, max_new_tokens, min_new_tokens, greedy, temperature, top_p,
                        return_logprobs, progress)

    def _ours(self, input_ids, attention_mask, n, max_new_tokens, min_new_tokens, greedy, temperature, top_p,
              return_logprobs, progress):
        from transformers import StaticCache

        if self.fused is not None:
            return self._fused(input_ids, attention_mask, n, max_new_tokens, min_new_tokens, greedy, temperature,
                               top_p, return_logprobs, progress)
        t0 = time.perf_counter()
        model, dev = self.model, input_ids.device
        ids, mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0).long()
        B, P0 = ids.shape
        # a compiled step: left-pad to the bucket so its shapes repeat; eager: no wasted prefill
        bucket = LENGTH_BUCKET if self.compile else 1
        P = -(-P0 // bucket) * bucket
        if P > P0:
            ids = torch.cat([ids.new_full((B, P - P0), self.pad_id), ids], 1)
            mask = torch.cat([mask.new_zeros((B, P - P0)), mask], 1)
        T = max_new_tokens
        L = P + -(-T // bucket) * bucket
        # Positions beyond the prompt are all 1: the causal mask (from the cache's length) hides those not yet
        # written, so one (B, L) mask serves every step and the step's shapes never change.
        full_mask = torch.cat([mask, mask.new_ones((B, L - P))], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # A compiled step (CUDA graphs above all) wants the same cache tensors at every call of a shape, so
        # those caches are kept (a few: a node sees the training and the evaluation shapes); an eager step
        # gets a fresh one, so a CPU node does not hold its KV memory between rounds.
        key = (B, L, str(dev))
        cache = self._caches.get(key) if self.compile else None
        if cache is None:
            cache = StaticCache(config=model.config, max_cache_len=L)
            if self.compile:
                if len(self._caches) >= 4:
                    self._caches.pop(next(iter(self._caches)))
                self._caches[key] = cache
        else:
            cache.reset()
        eos = torch.tensor(self.eos_ids, device=dev)
        opts = dict(greedy=greedy, temperature=float(temperature), top_p=float(top_p), min_new_tokens=int(min_new_tokens),
                    draw=self.draw)
        try:
            out = model(input_ids=ids, attention_mask=full_mask, position_ids=pos, cache=cache, use_cache=True,
                        logits_to_keep=1)
        except (TypeError, ValueError, NotImplementedError, AttributeError) as e:
            raise DecoderUnsupported(f"its forward refused a static cache: {type(e).__name__}: {e}") from e
        step = self._step(opts)

        def advance(tok, next_pos, finished, step_t, done):
            return step(model, tok, next_pos, full_mask, cache, finished, step_t, eos)

        result = self._loop(out.logits[:, -1].float(), pos[:, -1] + 1, advance, eos, opts, T, t0, L,
                            return_logprobs, progress)
        if self.compile and self._step_fn is not None and self._step_fn[1].failed \
                and self.fused is None and FusedLM.supports(model) is None:
            # the compiled step failed and this call ran HF's forward eagerly; the fused one is the faster eager path
            self.compile, self.fused, self._caches = False, FusedLM(model), {}
            log.info("decoding on p2pswarm's fused forward from now on (eager)")
        return result

    def _fused(self, input_ids, attention_mask, n, max_new_tokens, min_new_tokens, greedy, temperature, top_p,
               return_logprobs, progress):
        """The eager loop on FusedLM: the same sampling and stopping as _ours, the cache only as long as written."""
        t0 = time.perf_counter()
        f, dev = self.fused.bind(), input_ids.device
        mask = attention_mask.long()
        P, T = input_ids.shape[1], max_new_tokens
        B = input_ids.shape[0] * n
        eos = torch.tensor(self.eos_ids, device=dev)
        opts = dict(greedy=greedy, temperature=float(temperature), top_p=float(top_p), min_new_tokens=int(min_new_tokens),
                    draw=self.draw)
        try:
            # prefill each prompt once, then give each of its n samples a copy of its cache
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = f.new_cache(input_ids.shape[0], P + T, dev, f.dtype)
            logits = f.step(input_ids, pos, padding_bias(mask, P, f.dtype), cache, 0).float()
            if n > 1:
                cache = tuple([c.repeat_interleave(n, 0) for c in part] for part in cache)
                logits, pos, mask = (t.repeat_interleave(n, 0) for t in (logits, pos, mask))
            # generated columns are never padding: one (B, 1, 1, P + T) bias, cut to the columns written so far
            step_bias = padding_bias(torch.cat([mask, mask.new_ones((B, T))], 1), 1, f.dtype)

            def advance(tok, next_pos, finished, step_t, done):
                col = P + done - 1  # the column the previous token is written to
                logits = f.step(tok[:, None], next_pos[:, None], step_bias[..., : col + 1], cache, col).float()
                nxt, lp = sample_next(logits, step_t, eos, **opts)
                nxt = torch.where(finished, self.pad_id, nxt)
                return nxt, lp, finished | torch.isin(nxt, eos), next_pos + 1

            return self._loop(logits, pos[:, -1] + 1, advance, eos, opts, T, t0, P + T, return_logprobs, progress)
        finally:
            f.release()  # the fused copies are retaken next call: the trainer changes the weights in between

    def _loop(self, logits, next_pos, advance, eos, opts, T, t0, cache_len, return_logprobs, progress):
        """The token loop both forwards share: the first token from the prefill's `logits`, then
        advance(tok, next_pos, finished, step_t, done) -> (tok, lp, finished, next_pos) until T tokens or, read
        back every sync_every tokens, every row has ended."""
        dev = logits.device
        step_t = torch.zeros((), dtype=torch.long, device=dev)
        tok, lp = sample_next(logits, step_t, eos, **opts)
        finished = torch.isin(tok, eos)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # so that the split below is prefill vs decoding, not launch vs wait
        t_prefill = time.perf_counter()
        toks, lps = [tok], [lp]
        done = 1
        while done < T:
            if done % self.sync_every == 0:
                if progress is not None:
                    progress(done, T)
                if bool(finished.all()):
                    break
            step_t = step_t + 1
            tok, lp, finished, next_pos = advance(tok, next_pos, finished, step_t, done)
            toks.append(tok)
            lps.append(lp)
            done += 1
        if progress is not None:
            progress(T, T)
        new = torch.stack(toks, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        B = new.shape[0]
        # decode_tokens_per_s: rows x steps after the first, over the time after prefill (the bench's figure)
        self.last = {"seconds": t1 - t0, "prefill_s": t_prefill - t0, "decode_s": t1 - t_prefill, "steps": done,
                     "rows": B, "cache_len": cache_len,
                     "decode_tokens_per_s": B * (done - 1) / max(t1 - t_prefill, 1e-9)}
        if return_logprobs:
            return new, _after_eos_zero(new, torch.stack(lps, 1), eos)
        return new

    def _step(self, opts: dict) -> Callable:
        def step(model, tok, pos, full_mask, cache, finished, step_t, eos):
            logits = model(input_ids=tok[:, None], attention_mask=full_mask, position_ids=pos[:, None], cache=cache,
                           use_cache=True).logits[:, -1].float()
            nxt, lp = sample_next(logits, step_t, eos, **opts)
            nxt = torch.where(finished, self.pad_id, nxt)
            return nxt, lp, finished | torch.isin(nxt, eos), pos + 1

        if not self.compile:
            return step
        key = tuple(sorted(opts.items()))
        if self._step_fn is None or self._step_fn[0] != key:
            cuda = next(self.model.parameters()).device.type == "cuda"
            compiled = torch.compile(step, mode="reduce-overhead" if cuda else None, dynamic=False)
            self._step_fn = (key, _GuardedCompile(compiled, step, cuda))
        return self._step_fn[1]

    # ---- fallback ------------------------------------------------------------------------------
    def _hf(self, input_ids, attention_mask, n, max_new_tokens, min_new_tokens, greedy, temperature, top_p,
            return_logprobs, progress):
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Progress(StoppingCriteria):
            """Never stops generation; reports each decoding step."""

            def __init__(self):
                self.step = 0

            def __call__(self, input_ids, scores, **kwargs):
                self.step += 1
                progress(min(self.step, max_new_tokens), max_new_tokens)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=self.pad_id,
                                      eos_token_id=self.eos_ids, min_new_tokens=min_new_tokens or None)
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if progress is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Progress()])
        if return_logprobs:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        seq = out.sequences if return_logprobs else out
        new = seq[:, input_ids.shape[1]:]
        if not return_logprobs:
            return new
        logp = torch.stack([torch.log_softmax(x.float() / temperature, -1) for x in out.logits], 1)
        lp = logp.gather(-1, new[:, : logp.shape[1], None]).squeeze(-1)
        return new, _after_eos_zero(new, lp, torch.tensor(self.eos_ids, device=new.device))


def _after_eos_zero(new: torch.Tensor, lp: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Log-probs with 0 at the positions after each row's first eos (padding, not sampled)."""
    hit = torch.isin(new, eos).long()
    after = (hit.cumsum(1) - hit) > 0
    return lp.masked_fill(after, 0.0)


class _GuardedCompile:
    """A compiled step that falls back to the eager one (logged once) if compiling it fails. Under CUDA graphs
    a replay overwrites the previous replay's outputs, so each step's outputs are copied out (a few hundred
    bytes) before the loop keeps them."""

    def __init__(self, compiled: Callable, eager: Callable, cuda: bool):
        self.compiled, self.eager, self.cuda, self.failed = compiled, eager, cuda, False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                    return tuple(o.clone() for o in self.compiled(*args))
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - inductor/dynamo errors have no common base worth naming
                self.failed = True
                log.warning("decoding step runs eagerly: torch.compile failed (%s: %s)", type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "")
        return self.eager(*args)
