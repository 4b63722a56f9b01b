"""Does torch.compile pay for our decoding step (p2pswarm/decoding.py) on this machine?

    python bench/decode_compile.py            # embedded policy, 8 prompts x G=4, 64 tokens, 1 thread
    python bench/decode_compile.py --ops      # only count aten ops per generated token: ours vs HF generate
    python bench/decode_compile.py --train    # only the training forward + backward: HF / FusedLM, eager / compiled

Times Decoder.generate with the step eager and compiled (inductor on CPU; CUDA graphs on CUDA), 5 calls each
after a first call that pays for compiling, and writes bench/results/decode_compile.json. decoder_compile=auto
follows this: on CPU the step stays eager (bench/README.md).
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


def main() -> None:
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    device = models.pick_device(args[0] if args else "cpu")
    model, tok = models.load("embedded", device, torch.float32)
    model.eval()
    texts = [("question %d " % k) * (5 + 7 * k) for k in range(8)]  # 8 prompts of different lengths
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    eos = [model.generation_config.eos_token_id]
    if "--train" in sys.argv:
        res = json.loads(OUT.read_text()) if OUT.exists() else {}
        res["train_forward_backward"] = train_compile(model, tok) | {"loadavg": os.getloadavg()}
        OUT.write_text(json.dumps(res, indent=1) + "\n")
        return
    if "--ops" in sys.argv:
        res = json.loads(OUT.read_text()) if OUT.exists() else {}
        res["aten_ops_per_token"] = ops_per_token(model, tok, enc, eos)
        print(res["aten_ops_per_token"])
        OUT.write_text(json.dumps(res, indent=1) + "\n")
        return
    res: dict = {"device": str(device), "rows": 32, "new_tokens": 64, "loadavg_start": os.getloadavg()}
    for mode in ("off", "on"):
        d = Decoder(model, eos, tok.pad_token_id, choice="ours", compile=mode)
        run = lambda: d.generate(enc["input_ids"], enc["attention_mask"], n=4, max_new_tokens=64,  # noqa: E731
                                 min_new_tokens=64)
        t = time.perf_counter()
        run()
        first = time.perf_counter() - t
        calls = []
        for _ in range(5):
            t = time.perf_counter()
            run()
            calls.append(time.perf_counter() - t)
        res[f"compile_{mode}"] = {"first_call_s": first, "calls_s": calls, "median_s": statistics.median(calls),
                                  "tokens_per_s": 32 * 64 / statistics.median(calls),
                                  "compile_failed": bool(d._step_fn and d._step_fn[1].failed)}
        print(mode, res[f"compile_{mode}"], flush=True)
    res["loadavg_end"] = os.getloadavg()
    res["speedup_compiled"] = res["compile_off"]["median_s"] / res["compile_on"]["median_s"]
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
