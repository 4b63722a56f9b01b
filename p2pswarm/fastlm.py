"""A Llama-family causal LM's forward in a few fused ops, on the HF model's own weights (issue #17).

On the CPU a decoding step of the embedded policy was ~355 aten ops around 29 tiny matmuls: RMSNorm, rotary
embeddings, cache and mask plumbing cost ~3 ms of dispatch for ~0.4 ms of arithmetic (bench/README.md). This
module runs the same maths in about 15 ops a layer:

- q, k and v come from one matmul (their weights concatenated), gate and up from another (small models: past
  FUSE_MLP_MAX the copy costs more than a second matmul saves);
- rotary embeddings are one complex multiply: the rows of q's and k's weights are permuted within each head so
  that HF's half-split pairs (j, j + hd/2) sit side by side. q·k is unchanged by permuting both alike, and v
  and the output projection are untouched, so the model computes exactly what HF's does;
- RMSNorm is `F.rms_norm` (when decoding, its weight folded into the next matmul's); each residual add rides
  in its matmul (`addmm`); attention covers the cache written so far, not its full static length: a decoding
  step's one query a row as batched matmuls over (row, kv head), anything longer as one grouped-head
  `scaled_dot_product_attention`.

FusedLM.supports(model) says why a model cannot take this path (None when it can): Qwen2, Llama and Mistral
configurations with SiLU MLPs, plain rotary embeddings, no sliding window and no extra projections. Anything
else decodes through HF's forward (p2pswarm/decoding.py), and tests pin this path against that one.

The fused copies are taken by `bind()` (no grad) and must be taken again after the weights change: the decoder
binds at every generate call, since the trainer steps between calls. `forward_shared()` (training) builds them
with torch.cat inside autograd instead, so gradients reach the model's own parameters; it also computes each
prompt once for all the completions that follow it (a GRPO group's G rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FAMILIES = ("qwen2", "llama", "mistral")
# Gate and up are concatenated into one matmul (and, decoding, the norm's weight folded in) only below this
# many weights each: for a 0.5B model the copy cost ~190 ms a training micro-batch and ~0.3 s a generate call
# (4864 x 896 x 2 x 24 layers), where a second matmul's dispatch costs microseconds; for the embedded policy
# (256 x 64) one op less a layer is what counts.
FUSE_MLP_MAX = 1 << 20
# Decoding on the CPU, a weight of at least this many elements goes to oneDNN's matmul in its own packed layout:
# 2-2.5x MKL's sgemm at a decoding step's few rows on AVX-512 (8 x 896 x 4864: 0.9 ms against 2.3), slower below
# ~100k elements (a fixed ~13 us a call). Packing costs ~4x a copy, once a generate call (bench/README "FusedLM").
PACK_MIN = 1 << 17


@dataclass
class _Layer:
    wqkv: torch.Tensor | _Packed  # d x (nh + 2 nkv) hd, transposed: q, k, v; q and k rows permuted for rotary
    bqkv: torch.Tensor | None
    wo: torch.Tensor | _Packed  # nh hd x d, transposed for addmm
    bo: torch.Tensor | None
    wgu: torch.Tensor | tuple  # d x 2I: gate and up, transposed; or the two apart (tensors or _Packed)
    wdown: torch.Tensor | _Packed  # I x d, transposed
    ln1: torch.Tensor | None  # the norms' weights, None where folded into wqkv / wgu
    ln2: torch.Tensor | None
    scale: float | None  # attention's scale, None where folded into q's rows


class FusedLM:
    """The forward of a supported HF causal LM, for decoding (with a KV cache) and for training (with autograd).

    Positions are given per token (left-padded rows start at 0), the mask as an additive float bias, so that
    callers decide padding and causality; see Decoder and GRPOTrainer._logprobs for the two uses."""

    @staticmethod
    def supports(model) -> str | None:
        cfg = getattr(model, "config", None)
        kind = getattr(cfg, "model_type", None)
        if kind not in FAMILIES:
            return f"model type {kind!r} is not one of {', '.join(FAMILIES)}"
        if getattr(cfg, "hidden_act", None) != "silu":
            return f"activation {cfg.hidden_act!r} is not silu"
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            return f"rope type {rope.get('rope_type') or rope.get('type')!r} is not the plain one"
        if (getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", kind == "mistral")) or \
                "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            return "sliding-window attention"
        if getattr(cfg, "mlp_bias", False):
            return "MLP biases"
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
            return "not the usual model.layers / model.rotary_emb layout"
        a = inner.layers[0].self_attn
        if any(hasattr(a, n) for n in ("q_norm", "k_norm")):
            return "q/k norms"
        if getattr(cfg, "head_dim", None) not in (None, cfg.hidden_size // cfg.num_attention_heads):
            return "a head size other than hidden_size / heads"
        return None

    def __init__(self, model):
        reason = self.supports(model)
        if reason is not None:
            raise ValueError(reason)
        cfg = model.config
        self.model = model
        self.d = cfg.hidden_size
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = self.d // self.nh
        self.eps = float(cfg.rms_norm_eps)
        rot = model.model.rotary_emb
        self.inv_freq = rot.inv_freq.detach().float()
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        half = self.hd // 2
        within = torch.stack([torch.arange(half), torch.arange(half) + half], 1).reshape(-1)  # 0, h, 1, h+1, ...
        self._perm_q = (torch.arange(self.nh)[:, None] * self.hd + within).reshape(-1)
        self._perm_k = (torch.arange(self.nkv)[:, None] * self.hd + within).reshape(-1)
        self.layers: list[_Layer] = []
        self.head: _Packed | None = None  # the output embedding, packed for decoding (bind)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    # ---- weights ---------------------------------------------------------------------------------
    def _fuse(self, layer, fold: bool) -> _Layer:
        """fold (decoding): the norms' weights and attention's 1/sqrt(hd) go into the matmuls' weights, two ops
        less a layer, for weight copies taken anyway (q|k|v; gate|up up to FUSE_MLP_MAX). Training keeps them
        apart: multiplying every weight matrix in autograd at each micro-batch cost ~7% of a 0.5B model's
        forward + backward."""
        a, m = layer.self_attn, layer.mlp
        nq = self.nh * self.hd
        wqkv = torch.cat([a.q_proj.weight[self._perm_q], a.k_proj.weight[self._perm_k], a.v_proj.weight])
        bqkv = None
        if a.q_proj.bias is not None:
            bqkv = torch.cat([a.q_proj.bias[self._perm_q], a.k_proj.bias[self._perm_k], a.v_proj.bias])
        wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight]) if m.gate_proj.weight.numel() <= FUSE_MLP_MAX else None
        ln1, ln2, scale = layer.input_layernorm.weight, layer.post_attention_layernorm.weight, self.hd ** -0.5
        if fold:  # in place on the fresh copies (bind runs without autograd): no further weight-sized temporaries
            wqkv[:nq].mul_(scale)  # rotary is linear, so the scale commutes with it
            # RMSNorm's weight scales the matmul's input columns: (norm(x) * w) @ W.T == norm(x) @ (W * w).T
            wqkv.mul_(ln1)
            if bqkv is not None:
                bqkv[:nq].mul_(scale)
            ln1 = scale = None
            if wgu is not None:
                wgu.mul_(ln2)
                ln2 = None
        # the transposed views go to addmm / mm as they are: BLAS reads them transposed, no copy
        gu = (m.gate_proj.weight.t(), m.up_proj.weight.t()) if wgu is None else wgu.t()
        w = _Layer(wqkv.t(), bqkv, a.o_proj.weight.t(), a.o_proj.bias, gu, m.down_proj.weight.t(), ln1, ln2, scale)
        if fold and _packs(w.wqkv):
            w.wqkv, w.wo, w.wdown = _Packed.of(w.wqkv), _Packed.of(w.wo), _Packed.of(w.wdown)
            if isinstance(gu, tuple):
                w.wgu = (_Packed.of(gu[0]), _Packed.of(gu[1]))
            else:
                w.wgu = _Packed.of(gu)
        return w

    def _weights(self, fold: bool = False) -> list[_Layer]:
        return [self._fuse(layer, fold) for layer in self.model.model.layers]

    @torch.no_grad()
    def bind(self) -> FusedLM:
        """Take fused copies of the current weights for decoding (q|k|v; gate|up for small models)."""
        self.release()
        head = self.model.lm_head.weight
        self.head = _Packed.of(head.t(), getattr(self.model.lm_head, "bias", None)) if _packs(head.t()) else None
        self.layers = self._weights(fold=True)
        return self

    def release(self) -> None:
        self.layers, self.head = [], None

    # ---- maths -----------------------------------------------------------------------------------
    def rotary(self, pos: torch.Tensor) -> torch.Tensor:
        """(..., hd/2) complex rotations for integer positions `pos`."""
        ang = pos[..., None].float() * self.inv_freq.to(pos.device)
        return torch.polar(torch.full_like(ang, self.rope_scale), ang)

    def _rope(self, qkv: torch.Tensor, cis: torch.Tensor):
        """q, k, v as (B, heads, S, hd) from qkv (B, S, nh + 2 nkv, hd), q and k rotated by cis (B, S, hd/2)."""
        nh, nkv, hd = self.nh, self.nkv, self.hd
        x = qkv[:, :, : nh + nkv]
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # there is no complex bfloat16; the rotation is done in float32 and rounded once
        qk = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (hd // 2, 2))) * cis[:, :, None]).to(qkv.dtype)
        return (qk[:, :, :nh].flatten(-2).transpose(1, 2), qk[:, :, nh:].flatten(-2).transpose(1, 2),
                qkv[:, :, nh + nkv:].transpose(1, 2))

    def _sdpa(self, q, k, v, bias, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=self.nkv != self.nh,
                                              scale=1.0 if scale is None else scale)

    def _run(self, x: torch.Tensor, layers: list[_Layer], attend) -> torch.Tensor:
        """The decoder layers over flat tokens x (N, d); attend(i, layer, qkv (N, (nh + 2 nkv) hd)) -> (N, nh hd) is
        the only part that knows which token sees which."""
        d = self.d
        for i, w in enumerate(layers):
            att = attend(i, w, _mm(F.rms_norm(x, (d,), w.ln1, self.eps), w.wqkv, w.bqkv))
            x = _mm(att, w.wo, w.bo, add=x)
            h = F.rms_norm(x, (d,), w.ln2, self.eps)
            if not isinstance(w.wgu, tuple):
                g, u = _mm(h, w.wgu).chunk(2, -1)
                a = F.silu(g) * u
            elif isinstance(w.wgu[0], _Packed):
                a = w.wgu[1](h, times=w.wgu[0](h, silu=True))
            else:
                a = F.silu(torch.mm(h, w.wgu[0])) * torch.mm(h, w.wgu[1])
            x = _mm(a, w.wdown, add=x)
        return x

    def _layers(self, x, cis, bias, layers, cache, start):
        """Decoding: x (B, S, d); cache (keys, values) lists, keys (B, nkv, hd, L) and values (B, nkv, L, hd),
        written at columns [start, start + S)."""
        B, S, d = x.shape
        nh, nkv, hd = self.nh, self.nkv, self.hd
        end = start + S
        if S == 1:
            # one query per row: its heads grouped by their kv head, as batched matmuls over (row, kv head)
            bias = bias.expand(B, nkv, 1, end).reshape(B * nkv, 1, end)

        def attend(i, w, qkv):
            q, k, v = self._rope(qkv.view(B, S, nh + 2 * nkv, hd), cis)
            keys, values = cache[0][i], cache[1][i]
            keys[:, :, :, start:end] = k.transpose(2, 3)
            values[:, :, start:end] = v
            if S == 1:
                s = torch.baddbmm(bias, q.reshape(B * nkv, nh // nkv, hd), keys[..., :end].reshape(B * nkv, hd, end),
                                  alpha=1.0 if w.scale is None else w.scale)
                att = torch.bmm(s.softmax(-1), values[:, :, :end].reshape(B * nkv, end, hd)).view(B, nh, 1, hd)
            else:
                att = self._sdpa(q, keys[..., :end].transpose(2, 3), values[:, :, :end], bias, w.scale)
            return att.transpose(1, 2).reshape(B * S, nh * hd)

        return self._run(x.reshape(B * S, d), layers, attend).view(B, S, d)

    def forward_shared(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, comp_ids: torch.Tensor,
                       owner: torch.Tensor) -> torch.Tensor:
        """Training forward of R rows that share b prompts: row r is prompt owner[r] (left-padded, (b, P)) followed
        by comp_ids[r] ((R, C), right-padded). Each prompt is computed once, not once per completion (G times in
        a GRPO group); autograd sums what its completions send back, so the gradient is the unshared one's.
        Returns (R, C, V): the logits that predict comp_ids[:, 0 .. C-1]."""
        (b, P), (R, C) = prompt_ids.shape, comp_ids.shape
        nh, hd, H = self.nh, self.hd, self.nh + 2 * self.nkv
        mask = prompt_mask.long()
        pos_p = (mask.cumsum(-1) - 1).clamp(min=0)
        pos_c = mask.sum(-1, keepdim=True)[owner] + torch.arange(C, device=comp_ids.device)
        bias_p = padding_bias(mask, P, self.dtype)
        # a completion query sees its prompt's real tokens and the completion up to itself
        bias_c = torch.cat([padding_bias(mask, 1, self.dtype)[owner].expand(R, 1, C, P),
                            padding_bias(mask.new_ones((1, C)), C, self.dtype).expand(R, 1, C, C)], -1)
        cis_p, cis_c = self.rotary(pos_p), self.rotary(pos_c)
        split = b * P

        def attend(i, w, qkv):
            qp, kp, vp = self._rope(qkv[:split].view(b, P, H, hd), cis_p)
            qc, kc, vc = self._rope(qkv[split:].view(R, C, H, hd), cis_c)
            ap = self._sdpa(qp, kp, vp, bias_p, w.scale)
            ac = self._sdpa(qc, torch.cat([kp[owner], kc], 2), torch.cat([vp[owner], vc], 2), bias_c, w.scale)
            return torch.cat([ap.transpose(1, 2).reshape(split, nh * hd), ac.transpose(1, 2).reshape(R * C, nh * hd)])

        emb, head = self.model.model.embed_tokens.weight, self.model.lm_head.weight
        # Tied input and output embeddings (Qwen2.5 0.5B-3B, the embedded policy): autograd would sum two dense
        # vocabulary-sized gradients, the input side's mostly zeros (~0.9 s a micro-batch at Qwen's 152k x 896).
        # Here the output side's gradient is handed to the input side's backward, which adds its rows into it.
        tied = _Tied() if emb is head and emb.requires_grad and torch.is_grad_enabled() else None
        ids = torch.cat([prompt_ids.reshape(-1), comp_ids.reshape(-1)])
        x = F.embedding(ids, emb) if tied is None else _Embed.apply(ids, emb, tied)
        x = self._run(x, self._weights(), attend)
        last = x[:split].view(b, P, self.d)[:, -1][owner]  # the prompt's last position predicts the first token
        return self._head(torch.cat([last[:, None], x[split:].view(R, C, self.d)[:, : C - 1]], 1), tied)

    def _head(self, x: torch.Tensor, tied: _Tied | None = None, decoding: bool = False) -> torch.Tensor:
        """decoding: the packed copy bind() took, if any (training's no-grad calls read the live weights)."""
        inner = self.model.model
        x = F.rms_norm(x, (self.d,), inner.norm.weight, self.eps)
        w, bias = self.model.lm_head.weight, getattr(self.model.lm_head, "bias", None)
        if tied is not None:
            return _Head.apply(x, w, bias, tied)
        if decoding and self.head is not None:
            return self.head(x)
        return F.linear(x, w, bias)

    def new_cache(self, rows: int, length: int, device, dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys (rows, nkv, hd, length), transposed so that a query's scores are one batched matmul; values
        (rows, nkv, length, hd). Zeros: a column not yet written is hidden by the caller's bias."""
        n = len(self.model.model.layers)
        return ([torch.zeros((rows, self.nkv, self.hd, length), device=device, dtype=dtype) for _ in range(n)],
                [torch.zeros((rows, self.nkv, length, self.hd), device=device, dtype=dtype) for _ in range(n)])

    def step(self, ids: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor, cache, start: int,
             last_only: bool = True) -> torch.Tensor:
        """Decode (no grad, bound weights): ids/pos (B, S) written to cache columns [start, start + S); bias
        (B, 1, S, start + S) additive. Returns logits of the last position (B, V), or of all (B, S, V)."""
        x = F.embedding(ids, self.model.model.embed_tokens.weight)
        x = self._layers(x, self.rotary(pos), bias, self.layers, cache, start)
        return self._head(x[:, -1] if last_only else x, decoding=True)


def _mm(x: torch.Tensor, w, bias: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w + bias (+ add): w a transposed (in, out) view of a weight, or a _Packed one."""
    if isinstance(w, _Packed):
        return w(x, bias, add=add)
    if add is not None:
        return torch.addmm(add if bias is None else add + bias, x, w)
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


def _packs(w: torch.Tensor) -> bool:
    """Whether decoding packs this weight for oneDNN: a big enough float32 CPU one, where packing works."""
    return w.numel() >= PACK_MIN and w.device.type == "cpu" and w.dtype == torch.float32 and _packing_works()


_PACKING: list[bool] = []


def _packing_works() -> bool:
    """oneDNN's packed linear (the private ops torch.compile's CPU backend uses) exists in this build and computes
    F.linear's result on a small probe; checked once. False on builds without oneDNN, or if the ops change."""
    if not _PACKING:
        ok = False
        try:
            if torch.backends.mkldnn.is_available():
                g = torch.Generator().manual_seed(0)
                w, x, r = (torch.randn(s, generator=g) for s in ((48, 32), (5, 32), (5, 48)))
                p = _Packed.of(w.t())
                ok = bool(torch.allclose(p(x, add=r), F.linear(x, w) + r, atol=1e-4)
                          and torch.allclose(p(x, times=r), F.linear(x, w) * r, atol=1e-4)
                          and torch.allclose(p(x, silu=True), F.silu(F.linear(x, w)), atol=1e-4))
        except Exception:  # noqa: BLE001 - a private op that moved or is missing: MKL's matmul, as before
            ok = False
        _PACKING.append(ok)
    return _PACKING[0]


class _Packed:
    """A weight in oneDNN's packed layout for inference (no autograd): x @ W.T + b, optionally with silu applied,
    times `times` or plus `add`, in the same call."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None):
        self.w, self.b = packed, bias

    @staticmethod
    def of(wt: torch.Tensor, bias: torch.Tensor | None = None) -> _Packed:
        """wt: the weight's transposed (in, out) view, as _Layer holds it."""
        return _Packed(torch.ops.mkldnn._reorder_linear_weight(wt.t().contiguous(), None), bias)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, add: torch.Tensor | None = None,
                 times: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
        b = self.b if bias is None else bias
        lin = torch.ops.mkldnn._linear_pointwise
        if add is not None:
            return lin.binary(x, add, self.w, b, "add")
        if times is not None:
            return lin.binary(x, times, self.w, b, "mul")
        return lin(x, self.w, b, "swish" if silu else "none", [], "")


class _Tied:
    """The output embedding's weight gradient, passed from _Head's backward to _Embed's (which runs after it:
    the embedding feeds everything the head reads)."""
    grad: torch.Tensor | None = None


class _Head(torch.autograd.Function):
    """x @ W.T + b where W is also the input embedding: W's gradient goes to _Embed, not to autograd."""

    @staticmethod
    def forward(ctx, x, w, b, tied: _Tied):
        ctx.save_for_backward(x, w)
        ctx.has_bias, ctx.tied = b is not None, tied
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        ctx.tied.grad = g2.t() @ x.reshape(-1, x.shape[-1])
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (g2 @ w).view(x.shape), None, gb, None


class _Embed(torch.autograd.Function):
    """F.embedding whose weight gradient is the output side's (from _Head) with this side's rows added in place."""

    @staticmethod
    def forward(ctx, ids, w, tied: _Tied):
        ctx.save_for_backward(ids)
        ctx.tied, ctx.rows = tied, w.shape[0]
        return F.embedding(ids, w)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        grad, ctx.tied.grad = ctx.tied.grad, None
        if grad is None:  # the head was not part of this backward
            grad = g.new_zeros((ctx.rows, g.shape[-1]))
        return None, grad.index_add_(0, ids, g.reshape(-1, g.shape[-1])), None


def padding_bias(mask: torch.Tensor, queries: int, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, Q, L) additive bias for the last Q of L columns: causal, padding columns hidden. A padding query
    may still see itself, so that no row of the softmax is all -inf (its output is never read; a NaN there
    would reach the cache and, times a zero weight, every later row)."""
    B, L = mask.shape
    col = torch.arange(L, device=mask.device)
    row = torch.arange(L - queries, L, device=mask.device)[:, None]
    ok = (col <= row) & (mask[:, None, :] > 0) | (col == row)
    bias = torch.zeros(ok.shape, dtype=dtype, device=mask.device).masked_fill_(~ok, float("-inf"))
    return bias[:, None]
