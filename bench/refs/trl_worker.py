"""Trainer-speed worker (c): TRL's GRPOTrainer, in bench/.venv-trl (trl==1.16.0). See _common.py for the protocol.

TRL owns its training loop, so the worker runs trainer.train() for exactly as many optimizer steps as the driver
will ask for, and a callback blocks in on_step_begin until the driver says `step`; on_step_end reports.
  step time: on_step_begin -> on_step_end (generation, scoring, forward/backward of every micro-batch, clipping,
             optimizer step; TRL's logging after on_step_end is outside)
  generate:  the time spent in GRPOTrainer._generate (tokenise prompts, one batched generate of 8 x G, decode)
  train:     step time - generate
Settings matched to the other two sides: per_device_train_batch_size = 8, gradient_accumulation_steps = G (so one
optimizer step covers the 8 x G completions of one generation, in micro-batches of 8), num_iterations = 1, beta = 0,
loss_type = grpo, no gradient checkpointing, fp32, constant learning rate.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict

import _common as c

cfg = c.config()
ch = c.Channel()
t_setup = c.now()
torch = c.setup_torch(cfg)

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

G, seed, n_prompts, steps = cfg["G"], cfg["seed"], cfg["prompts"], cfg["steps"]
all_prompts = c.prompts(cfg)
rows = [{"prompt": m, "step": s, "pidx": i} for s in range(steps) for i, m in enumerate(all_prompts[s])]


def seeded_reward(prompts, completions, step, pidx, **kwargs):
    seen: dict[tuple[int, int], int] = defaultdict(int)
    out = []
    for s, i in zip(step, pidx):
        out.append(c.reward(seed, s, i, seen[(s, i)]))
        seen[(s, i)] += 1
    return out


torch.manual_seed(seed)
on_cuda, bf16 = cfg.get("device", "cpu").startswith("cuda"), cfg.get("dtype", "float32") == "bfloat16"
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.bfloat16 if bf16 else torch.float32)
tok = AutoTokenizer.from_pretrained(cfg["model"])
args = GRPOConfig(
    output_dir=tempfile.mkdtemp(), use_cpu=not on_cuda, bf16=bf16, fp16=False, seed=seed,
    per_device_train_batch_size=cfg["micro_batch"], gradient_accumulation_steps=n_prompts * G // cfg["micro_batch"],
    num_generations=G, max_completion_length=cfg["max_new_tokens"], num_iterations=1, max_steps=steps,
    learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
    beta=0.0, loss_type="grpo", epsilon=0.2, epsilon_high=0.28, temperature=1.0, top_p=1.0,
    gradient_checkpointing=cfg.get("gradient_checkpointing", False), shuffle_dataset=False, dataloader_num_workers=0,
    report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
    # fixed-length mode: eos is masked until max_new_tokens (generate's own min_new_tokens)
    generation_kwargs={"min_new_tokens": cfg["min_new_tokens"]} if cfg["min_new_tokens"] else None,
)
opt = c.OptimizerSteps()
watch = c.ParamWatch(model)
timing = {"gen_s": 0.0, "tokens": 0, "rows": 0, "longest": 0}
step_state = {"step": 0, "t0": 0.0, "n0": 0}


class Driven(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        ch.send(event="ready", setup_s=c.now() - t_setup, rss_mb=c.rss_mb(), threads=torch.get_num_threads(),
                versions=c.versions("torch", "transformers", "trl", "accelerate", "datasets"),
                settings={"per_device_train_batch_size": args.per_device_train_batch_size,
                          "gradient_accumulation_steps": args.gradient_accumulation_steps,
                          "steps_per_generation": args.steps_per_generation, "num_iterations": args.num_iterations,
                          "optimizer": args.optim, "gradient_checkpointing": args.gradient_checkpointing})

    def on_step_begin(self, args, state, control, **kwargs):
        cmd = ch.recv()
        if cmd != "step":
            raise SystemExit(f"driver said {cmd!r} before all {steps} steps were done")
        watch.snapshot()
        timing.update(gen_s=0.0, tokens=0, rows=0, longest=0)
        step_state["n0"] = opt.count
        step_state["t0"] = c.now()

    def on_step_end(self, args, state, control, **kwargs):
        step_s = c.now() - step_state["t0"]
        ch.send(**c.step_record(timing["gen_s"], step_s - timing["gen_s"], timing["tokens"], timing["rows"],
                                timing["longest"], opt.count - step_state["n0"], watch.delta()))
        step_state["step"] += 1


trainer = GRPOTrainer(model=model, reward_funcs=seeded_reward, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[Driven()])
_generate = trainer._generate


def timed_generate(prompts):
    t0 = c.now()
    out = _generate(prompts)
    timing["gen_s"] += c.now() - t0
    completion_ids = out[1]  # (prompt_ids, completion_ids, ...): ids cut after the first eos, eos kept
    timing["tokens"] += sum(len(ids) for ids in completion_ids)
    timing["rows"] += len(completion_ids)
    timing["longest"] = max(timing["longest"], max(len(ids) for ids in completion_ids))
    return out


trainer._generate = timed_generate
trainer.train()
ch.recv()  # quit
ch.send(event="done", peak_rss_mb=c.peak_rss_mb(), optimizer_steps=opt.count)
