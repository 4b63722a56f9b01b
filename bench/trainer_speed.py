"""Trainer speed against the references: p2pswarm's GRPOTrainer, Gensyn GenRL's GRPOLanguageTrainerModule and
TRL's GRPOTrainer on the same model (the embedded policy), the same prompts, the same seeded rewards.

    python bench/trainer_speed.py --setup      # only create / check the reference venvs, then exit
    python bench/trainer_speed.py --quick      # 2 configs, 1 warm-up + 5 timed steps (a few minutes)
    python bench/trainer_speed.py              # 6 configs, 2 warm-up + 8 timed steps (about 12 minutes)
    python bench/trainer_speed.py --threads 2  # on an idle machine
    python bench/trainer_speed.py --model qwen2.5-0.5b --sides p2pswarm --grid 4:16:fixed --prompts 2 \
        --max-prompt-tokens 64 --gc both --sequential --warmup 0 --reps 1   # the 0.5B-shaped model (below)
    python bench/trainer_speed.py --device cuda --dtype bfloat16   # on a GPU machine (the GPU is recorded)

--model qwen2.5-0.5b builds a model from Qwen2.5-0.5B's configuration (QWEN25_05B below, written out: no hub)
with random weights, seed 0, and the embedded policy's tokenizer (throughput does not depend on the weights;
ids past the tokenizer's 512 decode to nothing). It is saved once to a temporary folder every side loads.
--sequential runs the sides one after another instead of interleaved, for a model whose three trainers do not
fit in memory together. --gc both runs every config with gradient checkpointing off and on (peak RSS).

Each trainer runs in its own process and its own virtualenv (the project's .venv; bench/.venv-genrl with
gensyn-genrl; bench/.venv-trl with trl; created on first use). Per config the three workers are started, then
driven step by step in turn (p2pswarm, GenRL, TRL, p2pswarm, GenRL, TRL, ...), so the load of a shared machine
hits all three alike; what counts are the ratios. One step = one generate of 8 prompts x G completions + one
train step (one optimizer step over all 8 x G completions). Workers: bench/refs/*_worker.py.

Also measures this CPU's matmul throughput (a big square matmul; the model's own shapes at the decoding batch)
and a bare decoding step of the model, to put the generated tokens/s against what the hardware allows.

Writes bench/results/trainer_speed.json and .png (--quick: trainer_speed.quick.json / .png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
REFS = BENCH / "refs"
RESULTS = BENCH / "results"
MODEL = ROOT / "p2pswarm" / "assets" / "default_policy"

# Qwen/Qwen2.5-0.5B's config.json (the fields that shape the compute), ids remapped to the embedded tokenizer's.
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None, "max_window_layers": 24,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,  # Qwen's 151643 is past the embedded tokenizer
}
MODELS = {"embedded": "embedded policy (p2pswarm/assets/default_policy)",
          "qwen2.5-0.5b": "Qwen2.5-0.5B-shaped, random weights (bench/trainer_speed.py: QWEN25_05B)"}


def build_model(name: str, tmp: Path) -> Path:
    """The folder of the model every side loads: the embedded policy, or a 0.5B-shaped one built here."""
    if name == "embedded":
        return MODEL
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = tmp / name
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B))
    model.generation_config.eos_token_id = QWEN25_05B["eos_token_id"]
    model.generation_config.pad_token_id = QWEN25_05B["pad_token_id"]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(MODEL).save_pretrained(out)
    return out

# Versions the recorded results were measured with. The reference venvs pin transformers to the project's
# version so that all three sides run the same modelling and generation code.
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # a CPU build first, as the Makefile does
TRANSFORMERS_PIN = "transformers==5.23.0"
REFERENCES = {
    "genrl": {"venv": BENCH / ".venv-genrl", "pins": ["gensyn-genrl==0.3.0", TRANSFORMERS_PIN],
              "check": "import genrl.trainer.grpo_trainer"},
    "trl": {"venv": BENCH / ".venv-trl", "pins": ["trl==1.16.0", TRANSFORMERS_PIN], "check": "import trl"},
}
SIDES = ["p2pswarm", "genrl", "trl"]
LABELS = {"p2pswarm": "p2pswarm", "genrl": "GenRL 0.3.0", "trl": "TRL 1.16.0"}
N_PROMPTS = 8
MICRO_BATCH = 8
LR = 3e-5
STEP_TIMEOUT_S = 900


# ---- reference virtualenvs ---------------------------------------------------------------------------------
def venv_python(side: str) -> Path:
    if side == "p2pswarm":
        return Path(sys.executable)
    return REFERENCES[side]["venv"] / "bin" / "python"


def venv_ok(side: str) -> bool:
    py = venv_python(side)
    if not py.exists():
        return False
    r = subprocess.run([str(py), "-c", REFERENCES[side]["check"]], capture_output=True, text=True)
    return r.returncode == 0


def ensure_venv(side: str) -> str | None:
    """Create the reference venv if missing. Returns None when usable, else the reason (error text)."""
    if side == "p2pswarm" or venv_ok(side):
        return None
    ref = REFERENCES[side]
    venv = ref["venv"]
    print(f"[setup] creating {venv.relative_to(ROOT)} for the {side} reference: {TORCH_SPEC} (CPU build first), then "
          f"{' '.join(ref['pins'])}. One-time, a few minutes; delete the folder to redo it.", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", TORCH_SPEC],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *ref["pins"]]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip().splitlines()
            reason = f"`{' '.join(cmd[-3:])}` failed: " + " | ".join(err[-5:])
            print(f"[setup] {side}: {reason}", flush=True)
            return reason
    if not venv_ok(side):
        r = subprocess.run([str(venv_python(side)), "-c", ref["check"]], capture_output=True, text=True)
        reason = f"`{ref['check']}` failed: " + " | ".join(r.stderr.strip().splitlines()[-3:])
        print(f"[setup] {side}: {reason}", flush=True)
        return reason
    print(f"[setup] {venv.relative_to(ROOT)} ready", flush=True)
    return None


# ---- workers -----------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, side: str, cfg: dict, env: dict, log_dir: Path):
        self.side = side
        self.log_path = log_dir / f"{side}-{cfg['name'].replace(' ', '_')}.log"
        self.log = open(self.log_path, "w")
        if side == "p2pswarm":  # this checkout's code, not whatever copy the venv has installed
            env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [str(venv_python(side)), str(REFS / f"{side}_worker.py"), json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REFS, env=env,
        )

    def read(self, timeout: float = STEP_TIMEOUT_S) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            try:
                self.proc.wait(timeout=0 if not ready else 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            raise RuntimeError(f"{self.side} worker {'timed out' if not ready else 'died'} (exit {self.proc.returncode}); "
                               f"last log lines: {' | '.join(self.tail())}")
        return json.loads(line)

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def tail(self, n: int = 6) -> list[str]:
        self.log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-n:]

    def close(self) -> dict | None:
        done = None
        try:
            if self.proc.poll() is None:
                self.send("quit")
                done = self.read(60)
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return done


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    # p2pswarm/__init__.py sets OMP_WAIT_POLICY=PASSIVE, but libgomp reads it when torch is loaded: set it here, for
    # every side alike (spin-waiting OpenMP threads stall each other on a shared machine).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def make_prompts(steps: int, path: Path) -> None:
    """steps x 8 prompts (chat messages) from the project's `easy` reasoning-gym stream: identical for all sides."""
    from p2pswarm.data.reasoning_gym import ReasoningGymData

    data = ReasoningGymData("easy", seed=0, tasks_per_round=N_PROMPTS)
    path.write_text(json.dumps([[data.messages(t) for t in data.round_tasks(r)] for r in range(steps)]))


def run_config(cfg: dict, sides: list[str], args, env: dict, log_dir: Path) -> dict:
    steps = args.warmup + args.reps
    wcfg = {**cfg, "model": cfg.get("model_dir", str(MODEL)), "prompts_file": str(log_dir / "prompts.json"), "prompts": N_PROMPTS, "micro_batch": MICRO_BATCH, "lr": LR, "seed": args.seed,
            "threads": args.threads, "steps": steps, "flush_denormal": not args.no_flush_denormal}
    out: dict[str, dict] = {}
    workers: dict[str, Worker] = {}
    for side in sides:  # started one after the other, so that loading does not overlap
        try:
            w = Worker(side, wcfg, env, log_dir)
            workers[side] = w
            out[side] = {"ready": w.read(), "steps": []}
        except Exception as e:  # noqa: BLE001 - recorded, the other sides go on
            out[side] = {"error": str(e)}
            workers.pop(side, None)
            print(f"  {side}: could not start: {e}", flush=True)
    for k in range(steps if workers else 0):
        for side in sides:
            if side not in workers:
                continue
            try:
                workers[side].send("step")
                rec = workers[side].read()
                rec["warmup"] = k < args.warmup
                out[side]["steps"].append(rec)
            except Exception as e:  # noqa: BLE001
                out[side]["error"] = str(e)
                workers.pop(side).close()
                print(f"  {side}: failed at step {k}: {e}", flush=True)
        line = "  ".join(f"{s} {r['gen_s']:6.3f}+{r['train_s']:6.3f}s" for s in sides if out[s].get("steps")
                         and len(out[s]["steps"]) == k + 1 for r in [out[s]["steps"][-1]])
        print(f"  step {k}{' (warm-up)' if k < args.warmup else '          '}  gen+train: {line}", flush=True)
    for side, w in workers.items():
        done = w.close()
        if done:
            out[side]["done"] = done
    return {side: summarise(res) for side, res in out.items()}


def q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    i = (len(xs) - 1) * p
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def summarise(res: dict) -> dict:
    if "error" in res and not res.get("steps"):
        return {"error": res["error"]}
    timed = [s for s in res["steps"] if not s["warmup"]]
    if not timed:
        return {"error": res.get("error", "no timed step")}
    gen = [s["gen_s"] for s in timed]
    train = [s["train_s"] for s in timed]
    step = [s["gen_s"] + s["train_s"] for s in timed]
    tps = [s["gen_tokens"] / s["gen_s"] for s in timed]
    out = {
        "timed_steps": len(timed),
        "median_generate_s": statistics.median(gen),
        "median_train_s": statistics.median(train),
        "median_step_s": statistics.median(step),
        "iqr_generate_s": [q(gen, 0.25), q(gen, 0.75)],
        "iqr_train_s": [q(train, 0.25), q(train, 0.75)],
        "median_gen_tokens_per_s": statistics.median(tps),
        "median_decode_tokens_per_s": (statistics.median(s["decode_tokens_per_s"] for s in timed)
                                       if all("decode_tokens_per_s" in s for s in timed) else None),
        "mean_completion_tokens": statistics.fmean(s["gen_tokens"] / s["rows"] for s in timed),
        "mean_longest_completion": statistics.fmean(s["longest"] for s in timed),
        "completions_per_step": timed[0]["rows"],
        "optimizer_steps_per_step": [s["optimizer_steps"] for s in timed],
        "params_changed_every_step": all(s["param_max_abs_delta"] > 0 for s in res["steps"]),
        "optimizer_steps_total": res.get("done", {}).get("optimizer_steps"),
        "setup_s": res["ready"]["setup_s"],
        "rss_after_setup_mb": res["ready"]["rss_mb"],
        "peak_rss_mb": res.get("done", {}).get("peak_rss_mb"),
        "torch_threads": res["ready"]["threads"],
        "versions": res["ready"]["versions"],
        "settings": res["ready"]["settings"],
        "per_step": [{k: s[k] for k in ("gen_s", "train_s", "gen_tokens", "longest", "optimizer_steps", "warmup")}
                     for s in res["steps"]],
    }
    if "error" in res:
        out["error"] = res["error"]
    return out


def ratios(result: dict) -> dict:
    """p2pswarm / reference for generate, train and the whole step: ratio of the medians, and the median of the
    per-step ratios (paired: step k of both sides ran back to back)."""
    a = result.get("p2pswarm", {})
    out = {}
    for ref in ("genrl", "trl"):
        b = result.get(ref, {})
        if "median_step_s" not in a or "median_step_s" not in b:
            continue
        r = {}
        pa = [s for s in a["per_step"] if not s["warmup"]]
        pb = [s for s in b["per_step"] if not s["warmup"]]
        for key, f in (("generate", lambda s: s["gen_s"]), ("train", lambda s: s["train_s"]),
                       ("step", lambda s: s["gen_s"] + s["train_s"])):
            r[key] = statistics.median(f(s) for s in pa) / statistics.median(f(s) for s in pb)
            r[key + "_paired"] = statistics.median(f(x) / f(y) for x, y in zip(pa, pb))
        out[f"p2pswarm/{ref}"] = r
    return out


# ---- what the hardware allows --------------------------------------------------------------------------------
def model_flops(prompt_tokens: float, new_tokens: float, model_dir: Path = MODEL) -> dict:
    """Forward FLOPs per generated token for this Qwen2 (decoding with a KV cache), counting matmuls only."""
    c = json.loads((model_dir / "config.json").read_text())
    d, L, V, inter = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = d // nh
    linear_macs = L * (d * nh * hd + 2 * d * nkv * hd + nh * hd * d + 3 * d * inter) + d * V  # q,k,v,o, gate/up/down, lm head
    ctx = prompt_tokens + (new_tokens + 1) / 2  # mean number of keys a generated token attends to
    attn = 2 * L * nh * hd * 2 * ctx  # QK^T and AV: 2 FLOPs per MAC, both over ctx keys, every head
    return {
        "formula": "2*(L*(d*nh*hd + 2*d*nkv*hd + nh*hd*d + 3*d*I) + d*V) + 2*L*nh*hd*2*ctx, ctx = prompt + (T+1)/2",
        "linear_flops": 2 * linear_macs,
        "attention_flops_at_mean_ctx": attn,
        "mean_ctx": ctx,
        "flops_per_token": 2 * linear_macs + attn,
    }


def _time(fn, min_s: float = 0.3, reps: int = 5) -> float:
    """Best-of-`reps` seconds per call (each rep runs the call enough times to last min_s)."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_s / reps:
            break
        n *= 2
    best = t / n
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def stream_gbps(dtype) -> float:
    """This machine's memory read bandwidth, GB/s: the best of summing a 512 MB tensor (far past any cache)."""
    import torch

    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    return x.numel() * 4 / _time(lambda: x.sum(), min_s=0.5, reps=3) / 1e9


def hardware_probe(threads: int, batches: list[int], prompts_file: Path, model_dir: Path = MODEL,
                   decode_steps: int = 64, max_prompt_tokens: int = 1024) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from p2pswarm.fastlm import _packs as packs, _Packed as Packed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    c = json.loads((model_dir / "config.json").read_text())
    d, inter, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out: dict = {"threads": torch.get_num_threads()}
    peak = {}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        peak[n] = 2 * n**3 / _time(lambda: torch.matmul(a, b)) / 1e9
    out["square_matmul_gflops"] = {str(k): v for k, v in peak.items()}
    out["peak_gflops"] = max(peak.values())
    tiny = torch.ones(1)
    out["tiny_op_us"] = _time(lambda: torch.add(tiny, 1.0)) * 1e6
    out["memory_read_gbps"] = stream_gbps(torch.float32)

    # The model's own linear layers at the decoding batch (one token per row): F.linear, as nn.Linear calls it.
    L = c["num_hidden_layers"]
    shapes = {"q_proj/o_proj": (d, d, 2 * L), "k_proj/v_proj": (d, kv, 2 * L), "gate/up_proj": (d, inter, 2 * L),
              "down_proj": (inter, d, L), "lm_head": (d, V, 1)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out["params_total"] = sum(p.numel() for p in model.parameters())
    # Bytes a decoding step must read: every weight once (tied embeddings: the lm_head reads the table; the
    # embedding lookup of one row per token is negligible), fp32 here.
    out["weight_bytes_per_decode_step"] = sum(p.numel() * p.element_size() for p in model.parameters())
    out["params_without_embeddings"] = out["params_total"] - model.get_input_embeddings().weight.numel()
    prompts = json.loads(prompts_file.read_text())[0]
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
    lens = [min(len(tok(t, add_special_tokens=False)["input_ids"]), max_prompt_tokens) for t in texts]
    out["prompt_tokens_mean"] = statistics.fmean(lens)
    out["per_batch"] = {}
    for B in batches:
        per = {}
        step_s = 0.0
        for name, (i, o, count) in shapes.items():
            x, w = torch.randn(B, i), torch.randn(o, i)
            t = _time(lambda: F.linear(x, w))
            per[name] = {"in": i, "out": o, "calls_per_token_step": count, "us_per_call_f_linear": t * 1e6}
            if packs(w.t()):  # the kernel our decoder uses for this weight: the bound is the best this torch has
                pw = Packed.of(w.t())
                per[name]["us_per_call_onednn_packed"] = _time(lambda: pw(x)) * 1e6
                t = min(t, per[name]["us_per_call_onednn_packed"] / 1e6)
            per[name].update(us_per_call=t * 1e6, gflops=2 * B * i * o / t / 1e9)
            step_s += count * t
        # A bare decoding step: the model's forward for one new token per row with a KV cache, greedy.
        enc = tok([texts[k % len(texts)] for k in range(B)], return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False, truncation=True, truncation_side="left", max_length=max_prompt_tokens)
        with torch.no_grad():
            pre = model(**enc, use_cache=True)
            past = pre.past_key_values
            nxt = pre.logits[:, -1:].argmax(-1)
            mask = enc["attention_mask"]
            times = []
            for _ in range(decode_steps):
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
                t0 = time.perf_counter()
                o_ = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
                times.append(time.perf_counter() - t0)
                past, nxt = o_.past_key_values, o_.logits[:, -1:].argmax(-1)

            class Count(TorchDispatchMode):
                n = 0

                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    Count.n += 1
                    return func(*args, **(kwargs or {}))

            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            with Count():
                model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
        warm = times[min(8, len(times) // 2):]
        fwd = min(warm)
        out["per_batch"][str(B)] = {
            "decode_forward_step_s_median": statistics.median(warm),
            "weight_streaming_bound_tokens_per_s": B * out["memory_read_gbps"] * 1e9 / out["weight_bytes_per_decode_step"],
            "linear": per,
            "linear_only_step_s": step_s,
            "linear_bound_tokens_per_s": B / step_s,
            "decode_forward_step_s": fwd,
            "decode_forward_tokens_per_s": B / fwd,
            "aten_ops_per_decode_step": Count.n,
        }
    return out


def efficiency(results: dict, hw: dict, configs: list[dict]) -> dict:
    """Achieved generated tokens/s against the bounds, per config."""
    out = {}
    for cfg in configs:
        res = results.get(cfg["name"], {})
        B = N_PROMPTS * cfg["G"]
        ref = res.get("p2pswarm", {})
        new = ref.get("mean_completion_tokens", cfg["max_new_tokens"])
        fl = model_flops(hw["prompt_tokens_mean"], new, Path(hw["model_dir"]))
        pb = hw["per_batch"][str(B)]
        peak_tps = hw["peak_gflops"] * 1e9 / fl["flops_per_token"]
        # The tighter of the two bounds of the issue: reading every weight once per step, or the model's own
        # matmul shapes at this batch on this CPU.
        tighter = min(pb["weight_streaming_bound_tokens_per_s"], pb["linear_bound_tokens_per_s"])
        e = {"batch_rows": B, "flops_per_token": fl["flops_per_token"], "mean_ctx": fl["mean_ctx"],
             "peak_matmul_bound_tokens_per_s": peak_tps,
             "linear_shapes_bound_tokens_per_s": pb["linear_bound_tokens_per_s"],
             "weight_streaming_bound_tokens_per_s": pb["weight_streaming_bound_tokens_per_s"],
             "tighter_bound_tokens_per_s": tighter,
             "bare_forward_bound_tokens_per_s": pb["decode_forward_tokens_per_s"], "achieved": {}}
        for side, r in ((k, v) for k, v in res.items() if isinstance(v, dict)):
            if "median_gen_tokens_per_s" in r:
                tps = r["median_gen_tokens_per_s"]
                best = max(s["gen_tokens"] / s["gen_s"] for s in r["per_step"] if not s["warmup"])
                e["achieved"][side] = {"tokens_per_s": tps, "best_tokens_per_s": best,
                                       "gflops": tps * fl["flops_per_token"] / 1e9,
                                       "fraction_of_peak": tps / peak_tps,
                                       "fraction_of_linear_shapes_bound": tps / pb["linear_bound_tokens_per_s"],
                                       "fraction_of_tighter_bound": tps / tighter,
                                       "decode_only_tokens_per_s": r.get("median_decode_tokens_per_s"),
                                       "decode_only_fraction_of_tighter_bound":
                                           (r.get("median_decode_tokens_per_s") or 0) / tighter,
                                       "fraction_of_bare_forward": tps / pb["decode_forward_tokens_per_s"]}
        out[cfg["name"]] = e
    return out


# ---- report ------------------------------------------------------------------------------------------------
def table(results: dict, configs: list[dict], rat: dict) -> str:
    lines = ["| config | trainer | generate s | train s | step s | gen tok/s | tokens/completion | opt steps | params changed | peak RSS MB | gen ratio | train ratio | step ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in configs:
        res = results[cfg["name"]]
        for side in SIDES:
            r = res.get(side)
            if r is None:
                continue
            if "median_step_s" not in r:
                lines.append(f"| {cfg['name']} | {LABELS[side]} | failed: {r.get('error', '?')[:120]} |")
                continue
            rr = rat.get(cfg["name"], {}).get(f"p2pswarm/{side}")
            ratio = (f"{rr['generate']:.2f} | {rr['train']:.2f} | {rr['step']:.2f}" if rr else "1 | 1 | 1")
            steps = sorted(set(r["optimizer_steps_per_step"]))
            lines.append(
                f"| {cfg['name']} | {LABELS[side]} | {r['median_generate_s']:.3f} | {r['median_train_s']:.3f} | "
                f"{r['median_step_s']:.3f} | {r['median_gen_tokens_per_s']:.0f} | {r['mean_completion_tokens']:.1f} | "
                f"{'/'.join(map(str, steps))} | {'yes' if r['params_changed_every_step'] else 'NO'} | "
                f"{r['peak_rss_mb']:.0f} | {ratio} |")
    return "\n".join(lines)


def plot(results: dict, configs: list[dict], eff: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    colors = {"p2pswarm": "#1f77b4", "genrl": "#ff7f0e", "trl": "#2ca02c"}
    names = [c["name"] for c in configs]
    fig, axes = plt.subplots(3, 1, figsize=(max(10.0, 1.9 * len(names) + 2), 14))
    width = 0.27
    for ax, key, iqr, label in ((axes[0], "median_generate_s", "iqr_generate_s", "generate (s)"),
                                (axes[1], "median_train_s", "iqr_train_s", "train step (s)")):
        for k, side in enumerate(SIDES):
            xs, ys, lo, hi = [], [], [], []
            for i, n in enumerate(names):
                r = results[n].get(side, {})
                if key in r:
                    xs.append(i + (k - 1) * width)
                    ys.append(r[key])
                    lo.append(r[key] - r[iqr][0])
                    hi.append(r[iqr][1] - r[key])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colors[side], label=LABELS[side])
        for i, n in enumerate(names):  # p2pswarm / reference above each group
            a = results[n].get("p2pswarm", {}).get(key)
            refs = [f"÷ {LABELS[s].split()[0]} {a / results[n][s][key]:.2f}" for s in ("genrl", "trl")
                    if a and key in results[n].get(s, {})]
            top = max((results[n].get(s, {}).get(iqr, [0, 0])[1] for s in SIDES), default=0)
            if refs:
                ax.annotate("p2pswarm\n" + "\n".join(refs), (i, top), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.margins(y=0.25)
        ax.set_xticks(range(len(names)), names, fontsize=9)
        ax.set_ylabel(label + ", log scale")
        ax.set_title(f"{label}: median, whiskers = IQR; labels: p2pswarm time ÷ reference time (< 1: p2pswarm faster)",
                     fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    ax = axes[2]
    kinds = [("achieved p2pswarm", lambda e: e["achieved"].get("p2pswarm", {}).get("tokens_per_s"), colors["p2pswarm"]),
             ("achieved GenRL", lambda e: e["achieved"].get("genrl", {}).get("tokens_per_s"), colors["genrl"]),
             ("achieved TRL", lambda e: e["achieved"].get("trl", {}).get("tokens_per_s"), colors["trl"]),
             ("p2pswarm decoding steps only (no prefill)",
              lambda e: e["achieved"].get("p2pswarm", {}).get("decode_only_tokens_per_s"), "#17becf"),
             ("bare HF forward (KV cache, no sampling)", lambda e: e["bare_forward_bound_tokens_per_s"], "#7f7f7f"),
             ("weights read once per step at this memory bandwidth",
              lambda e: e.get("weight_streaming_bound_tokens_per_s"), "#9467bd"),
             ("the model's matmuls alone, at their shapes", lambda e: e["linear_shapes_bound_tokens_per_s"], "#bcbd22"),
             ("FLOPs at peak matmul throughput", lambda e: e["peak_matmul_bound_tokens_per_s"], "#d62728")]
    w = 0.8 / len(kinds)
    for k, (lab, f, col) in enumerate(kinds):
        xs = [i + (k - len(kinds) / 2 + 0.5) * w for i in range(len(names))]
        ys = [f(eff[n]) or 0 for n in names]
        ax.bar(xs, ys, w, color=col, label=lab)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, fontsize=9)
    ax.set_ylabel("generated tokens/s, log scale")
    ax.set_title("generation against what the hardware allows (bounds: best of repeated measurements)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_info(threads: int) -> dict:
    cpu = ""
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu or platform.processor(), "cpu_mhz": mhz,
            "cpus": os.cpu_count(), "torch_threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "loadavg_start": os.getloadavg()}


def main() -> None:
    global N_PROMPTS, MICRO_BATCH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 configs (G=4, 64 tokens), 1 warm-up + 5 timed steps")
    ap.add_argument("--setup", action="store_true", help="create / check the reference venvs, then exit")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OMP/MKL threads for every side (default 1: on a shared machine two OpenMP threads "
                         "stall on each other; use 2 on an idle 2-core machine)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per trainer and config (default 8; quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; quick 1)")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of p2pswarm,genrl,trl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", choices=sorted(MODELS), default="embedded")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (with --dtype bfloat16 on a GPU machine)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=N_PROMPTS, help="prompts per step (default 8)")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024, help="prompts cut to their last N tokens")
    ap.add_argument("--grid", default=None, help="configs as G:T:mode,... (mode fixed or eos), e.g. 4:16:fixed")
    ap.add_argument("--gc", choices=["off", "on", "both"], default="off", help="gradient checkpointing per config")
    ap.add_argument("--sequential", action="store_true", help="one side after another (memory), not interleaved")
    ap.add_argument("--decode-steps", type=int, default=64, help="bare decoding steps timed in the hardware probe")
    ap.add_argument("--no-flush-denormal", action="store_true",
                    help="do not torch.set_flush_denormal(True) in the workers (p2pswarm's node does it)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/trainer_speed[.quick].json)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON", help="redraw the PNG of a results JSON, then exit")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(saved["results"], saved["configs"], saved["efficiency"], args.replot.with_suffix(".png"), saved["plot_title"])
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (the hardware probe runs in this process)
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown:
        ap.error(f"unknown side(s): {', '.join(sorted(unknown))}")

    setup_errors = {s: e for s in sides if (e := ensure_venv(s))}
    if args.setup:
        for s in sides:
            if s != "p2pswarm":
                state = f"FAILED: {setup_errors[s]}" if s in setup_errors else "ready"
                print(f"[setup] {REFERENCES[s]['venv'].relative_to(ROOT)} ({' '.join(REFERENCES[s]['pins'])}): {state}")
        sys.exit(1 if setup_errors else 0)
    run_sides = [s for s in sides if s not in setup_errors]

    N_PROMPTS = args.prompts
    MICRO_BATCH = min(MICRO_BATCH, N_PROMPTS * 2)
    args.reps = args.reps or (5 if args.quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    grid = [(4, 64, "fixed"), (4, 64, "eos")] if args.quick else \
        [(4, 64, "fixed"), (4, 128, "fixed"), (8, 64, "fixed"), (8, 128, "fixed"), (4, 64, "eos"), (8, 64, "eos")]
    if args.grid:
        grid = [(int(g), int(t), m) for g, t, m in (x.split(":") for x in args.grid.split(","))]
    gcs = {"off": [False], "on": [True], "both": [False, True]}[args.gc]
    configs = [{"name": f"G{g} T{t} {mode}" + (" gc" if gc else ""), "G": g, "max_new_tokens": t, "length": mode,
                "min_new_tokens": t if mode == "fixed" else 0, "gradient_checkpointing": gc,
                "device": args.device, "dtype": args.dtype, "max_prompt_tokens": args.max_prompt_tokens}
               for g, t, mode in grid for gc in gcs]

    tmp = Path(tempfile.mkdtemp(prefix="trainer_speed-"))
    prompts_file = tmp / "prompts.json"
    make_prompts(args.warmup + args.reps, prompts_file)
    env = worker_env(args.threads)
    info = machine_info(args.threads)
    if args.device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "requested, none found"
    model_dir = build_model(args.model, tmp)
    print(f"trainer speed: {len(configs)} configs x {run_sides}, {args.warmup} warm-up + {args.reps} timed steps, "
          f"{args.threads} thread(s); worker logs in {tmp}", flush=True)
    t_start = time.perf_counter()
    print("hardware probe (matmul throughput, bare decoding step) ...", flush=True)
    hw = hardware_probe(args.threads, sorted({N_PROMPTS * c["G"] for c in configs}), prompts_file, model_dir,
                        args.decode_steps, args.max_prompt_tokens)
    hw["model_dir"] = str(model_dir)
    print(f"  peak {hw['peak_gflops']:.1f} GFLOP/s; decode forward at batch 32: "
          f"{hw['per_batch'].get('32', {}).get('decode_forward_step_s', float('nan')) * 1e3:.2f} ms/step", flush=True)
    results: dict[str, dict] = {}
    for cfg in configs:
        print(f"[{cfg['name']}] 8 prompts x G={cfg['G']}, max_new_tokens {cfg['max_new_tokens']}, "
              f"{'every completion exactly max_new_tokens (eos masked until then)' if cfg['length'] == 'fixed' else 'stop at eos'}",
              flush=True)
        cfg_run = {**cfg, "model_dir": str(model_dir)}
        if args.sequential:  # one side at a time: a 0.5B model's three trainers do not fit in memory together
            results[cfg["name"]] = {}
            for side in run_sides:
                results[cfg["name"]].update(run_config(cfg_run, [side], args, env, tmp))
        else:
            results[cfg["name"]] = run_config(cfg_run, run_sides, args, env, tmp)
        r = results[cfg["name"]]
        for ref in ("trl", "genrl"):  # the figures, per config: p2pswarm step time / the reference's
            if "median_step_s" in r.get("p2pswarm", {}) and "median_step_s" in r.get(ref, {}):
                r[f"step_ratio_vs_{ref}"] = r["p2pswarm"]["median_step_s"] / r[ref]["median_step_s"]
        r["params"] = hw["params_total"]
        for s, e in setup_errors.items():
            results[cfg["name"]][s] = {"error": e}
    rat = {n: ratios(r) for n, r in results.items()}
    eff = efficiency(results, hw, configs)
    info["loadavg_end"] = os.getloadavg()
    report = table(results, configs, rat)
    print("\n" + report + "\n")
    for n, e in eff.items():
        ach = ", ".join(f"{s} {a['tokens_per_s']:.0f} ({a['fraction_of_peak'] * 100:.2f}% of peak)" for s, a in e["achieved"].items())
        print(f"[{n}] {e['flops_per_token'] / 1e6:.3f} MFLOP/token; bounds: peak matmul {e['peak_matmul_bound_tokens_per_s']:.0f}, "
              f"model's matmul shapes {e['linear_shapes_bound_tokens_per_s']:.0f}, bare forward "
              f"{e['bare_forward_bound_tokens_per_s']:.0f} tok/s; achieved: {ach}")
    versions = {s: next((r[s]["versions"] for r in results.values() if "versions" in r.get(s, {})), None) for s in sides}
    result = {
        "benchmark": "trainer_speed",
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": time.perf_counter() - t_start,
        "machine": info,
        "versions": versions,
        "pins": {s: REFERENCES[s]["pins"] for s in REFERENCES} | {"torch": TORCH_SPEC},
        "setup_errors": setup_errors,
        "workload": {
            "model": MODELS[args.model], "params": hw["params_total"], "device": args.device, "dtype": args.dtype,
            "max_prompt_tokens": args.max_prompt_tokens, "prompts": N_PROMPTS,
            "prompt_source": "p2pswarm easy preset, seed 0, the same prompts in the same order for every trainer",
            "reward": "seeded uniform [0,1) per (step, prompt, completion), the same for every trainer",
            "step": "one generate of 8 x G completions + one train step = one optimizer step over all 8 x G",
            "micro_batch": MICRO_BATCH, "learning_rate": LR, "beta": 0.0, "temperature": 1.0, "top_p": 1.0,
            "fixed_length": "min_new_tokens = max_new_tokens: every completion has exactly max_new_tokens tokens",
            "eos": "generation stops at eos (the embedded policy answers in about 5 tokens)",
            "flush_denormal": not args.no_flush_denormal, "warmup_steps": args.warmup, "timed_steps": args.reps,
            "order": "per step: " + ", ".join(run_sides) + " (interleaved)",
        },
        "configs": configs,
        "results": results,
        "ratios": rat,
        "hardware": hw,
        "efficiency": eff,
        "table": report,
        "plot_title": f"{N_PROMPTS} prompts x G, {args.model} ({hw['params_total'] / 1e6:.1f}M params), "
                      f"{args.threads} thread(s), {info.get('gpu') or info['cpu']}; median of {args.reps} "
                      f"{'sequential' if args.sequential else 'interleaved'} steps",
    }
    if not args.no_save:
        stem = "trainer_speed" + ("" if args.model == "embedded" else f"_{args.model}")
        out = args.out or RESULTS / (f"{stem}.quick.json" if args.quick else f"{stem}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        png = out.with_suffix(".png")
        plot(results, configs, eff, png, result["plot_title"])
        print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} and {png.name}")


if __name__ == "__main__":
    main()
