"""Does torch.compile pay for our decoding step (p2pswarm/decoding.py) on this machine? Every decoding path, timed.

    python bench/decode_compile.py            # embedded policy, 8 prompts x G=4, 64 tokens, 1 thread: each path
    python bench/decode_compile.py --ops      # only count aten ops per generated token: ours vs HF generate
    python bench/decode_compile.py --train    # only the training forward + backward: HF / FusedLM, eager / compiled
    python3 bench/decode_compile.py cuda --dtype bfloat16 [--model qwen2.5-0.5b] [--train]   # on a GPU machine

Needs only torch and transformers (a GPU machine's image has both). Results other than the CPU/fp32/embedded
default go to results/decode_compile.<device>-<dtype>-<model>.json.

Times Decoder.generate on FusedLM (eager), on HF's forward with a static cache (eager; compiled with CUDA graphs
on CUDA, or on the CPU with --compile) and HF generate, 5 calls each after a first call that pays for any
compiling. decoder_compile=auto follows this: on CPU the step stays eager (bench/README.md).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from p2pswarm import models  # noqa: E402
from p2pswarm.decoding import Decoder  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "decode_compile.json"


def ops_per_token(model, tok, enc, eos) -> dict:
    """aten ops per generated token (eager): (ops of 33 tokens - ops of 1) / 32, for our loop on FusedLM, on HF's
    forward with a StaticCache, and for generate.
    A count, not a timing: it does not depend on the machine's load."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    fused = Decoder(model, eos, tok.pad_token_id, choice="ours", compile="off")
    d = Decoder(model, eos, tok.pad_token_id, choice="ours", compile="off", fused=False)
    sides = {
        "ours_fused": lambda T: fused.generate(enc["input_ids"], enc["attention_mask"], n=4, max_new_tokens=T,
                                               min_new_tokens=T),
        "ours": lambda T: d.generate(enc["input_ids"], enc["attention_mask"], n=4, max_new_tokens=T, min_new_tokens=T),
        "hf_generate": lambda T: model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=True, top_k=0,
                                                num_return_sequences=4, pad_token_id=tok.pad_token_id, eos_token_id=eos),
    }
    out = {}
    for name, f in sides.items():
        counts = []
        for T in (1, 33):
            Count.n = 0
            with Count():
                f(T)
            counts.append(Count.n)
        out[name] = (counts[1] - counts[0]) / 32
    return out


def train_compile(model, tok) -> dict:
    """One micro-batch of the training forward + backward: 8 rows (2 prompts x G=4, the prompts left-padded to
    192 tokens, 64-token completions), as trainer._logprobs runs it: HF's forward on all 8 x 256 positions
    (logits kept for the last 65) and FusedLM.forward_shared (each prompt once), each eager and under
    torch.compile: does compiling the training pay?"""
    from p2pswarm.fastlm import FusedLM

    g = torch.Generator().manual_seed(0)
    P, C, G = 192, 64, 4
    pid = torch.randint(3, len(tok), (2, P), generator=g)
    pm = torch.ones_like(pid)
    pm[:, :40] = 0  # left padding, as the trainer's batches have
    cid = torch.randint(3, len(tok), (2 * G, C), generator=g)
    owner = torch.arange(2).repeat_interleave(G)
    ids, attn = torch.cat([pid[owner], cid], 1), torch.cat([pm[owner], torch.ones_like(cid)], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    model.train()
    fused = FusedLM(model)

    def hf(m):
        return m(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=C + 1, use_cache=False).logits

    sides = {"hf_eager": lambda: hf(model), "hf_compiled": (lambda c: lambda: hf(c))(torch.compile(model)),
             "fused_eager": lambda: fused.forward_shared(pid, pm, cid, owner),
             "fused_compiled": (lambda c: lambda: c(pid, pm, cid, owner))(torch.compile(fused.forward_shared))}
    res = {"rows": 2 * G, "prompt_tokens": P, "completion_tokens": C}
    for mode, fn in sides.items():
        t = time.perf_counter()
        fn().float().log_softmax(-1).mean().backward()
        first = time.perf_counter() - t
        calls = []
        for _ in range(5):
            t = time.perf_counter()
            fn().float().log_softmax(-1).mean().backward()
            calls.append(time.perf_counter() - t)
        res[mode] = {"first_call_s": first, "calls_s": calls, "median_s": statistics.median(calls)}
        print(mode, res[mode], flush=True)
    res["speedup_compiled_hf"] = res["hf_eager"]["median_s"] / res["hf_compiled"]["median_s"]
    res["speedup_compiled_fused"] = res["fused_eager"]["median_s"] / res["fused_compiled"]["median_s"]
    res["speedup_fused_over_hf"] = res["hf_eager"]["median_s"] / res["fused_eager"]["median_s"]
    model.eval()
    return res


def paths(model, tok, enc, eos, rows_per_prompt: int, new_tokens: int, compiled: bool) -> dict:
    """Decoder.generate timed on each of its paths: FusedLM eager (the default off CUDA), HF's forward with a
    static cache eager and compiled (CUDA graphs on CUDA: the default there), and HF generate. 5 calls each
    after a first call that pays for any compiling."""
    dev = next(model.parameters()).device
    sides = {"fused_eager": dict(compile="off"), "static_cache_eager": dict(compile="off", fused=False),
             "static_cache_compiled": dict(compile="on", fused=False), "hf_generate": dict(choice="hf")}
    if not compiled:
        sides.pop("static_cache_compiled")
    rows = enc["input_ids"].shape[0] * rows_per_prompt
    res = {}
    for name, kw in sides.items():
        d = Decoder(model, eos, tok.pad_token_id, **({"choice": "ours"} | kw))

        def run():
            d.generate(enc["input_ids"], enc["attention_mask"], n=rows_per_prompt, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
        calls = []
        for _ in range(5):
            t = time.perf_counter()
            run()
            calls.append(time.perf_counter() - t)
        res[name] = {"path": d.path, "first_call_s": first, "calls_s": calls, "median_s": statistics.median(calls),
                     "tokens_per_s": rows * new_tokens / statistics.median(calls),
                     "compile_failed": bool(d._step_fn and d._step_fn[1].failed)}
        print(name, res[name], flush=True)
    return res


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("device", nargs="?", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model", default="embedded", choices=["embedded", "qwen2.5-0.5b"])
    ap.add_argument("--ops", action="store_true", help="only count aten ops per generated token")
    ap.add_argument("--train", action="store_true", help="only the training forward + backward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="time the compiled path on the CPU too (minutes of compiling)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = models.pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    _, tok = models.load("embedded", device, dtype)
    if args.model == "embedded":
        model = models.load("embedded", device, dtype)[0]
    else:  # the 0.5B shape with random weights (throughput does not depend on them)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from trainer_speed import QWEN25_05B

        torch.manual_seed(0)
        cfg = {k: v for k, v in QWEN25_05B.items() if k not in ("architectures", "model_type")}
        model = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(device=device, dtype=dtype)
    model.eval()
    out = OUT if (device.type, args.dtype, args.model) == ("cpu", "float32", "embedded") else \
        OUT.with_name(f"decode_compile.{device.type}-{args.dtype}-{args.model}.json")
    texts = [("question %d " % k) * (5 + 7 * k) for k in range(8)]  # 8 prompts of different lengths
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    eos = [tok.eos_token_id]
    res = json.loads(out.read_text()) if out.exists() else {}
    res.update(device=str(device), dtype=args.dtype, model=args.model, torch=torch.__version__,
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    if args.train:
        res["train_forward_backward"] = train_compile(model, tok) | {"loadavg": os.getloadavg()}
    elif args.ops:
        res["aten_ops_per_token"] = ops_per_token(model, tok, enc, eos)
        print(res["aten_ops_per_token"])
    else:
        res["paths"] = {"rows": 32, "new_tokens": 64, "loadavg_start": os.getloadavg()} | paths(model, tok, enc, eos, 4, 64, device.type == "cuda" or args.compile)
        res["paths"]["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
