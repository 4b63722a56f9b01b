"""Trainer-speed worker (a): p2pswarm's GRPOTrainer, in the project's own venv. See _common.py for the protocol.

One step = trainer.generate(8 tasks) (one batched generate of 8 x G) + trainer.train(state) with all 8 groups,
num_iterations = 1 (one optimizer step), micro-batches of 8 sequences (gradient accumulation).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c

cfg = c.config()
ch = c.Channel()
t_setup = c.now()
torch = c.setup_torch(cfg)

from p2pswarm import models  # noqa: E402
from p2pswarm.settings import load_settings  # noqa: E402
from p2pswarm.trainer import GRPOTrainer  # noqa: E402
from p2pswarm.types import GameState, Task  # noqa: E402

G, seed = cfg["G"], cfg["seed"]
device, dtype = cfg.get("device", "cpu"), cfg.get("dtype", "float32")
s = load_settings(
    model=cfg["model"], device=device, dtype=dtype, threads=cfg["threads"], seed=seed,
    decoder=cfg.get("decoder", "auto"), gradient_checkpointing=cfg.get("gradient_checkpointing", False),
    max_prompt_tokens=cfg.get("max_prompt_tokens", 1024),
    num_generations=G, tasks_per_round=cfg["prompts"], local_groups=cfg["prompts"], swarm_groups=0,
    max_new_tokens=cfg["max_new_tokens"], num_iterations=1, micro_batch_size=cfg["micro_batch"],
    learning_rate=cfg["lr"], beta=0.0, loss_type="grpo", temperature=1.0, top_p=1.0,
    runs_dir=Path(tempfile.mkdtemp()),
)
torch.manual_seed(seed)
model, tok = models.load(s.model, models.pick_device(device), models.pick_dtype(dtype, models.pick_device(device)))
if cfg["min_new_tokens"]:  # fixed-length mode: eos is masked until max_new_tokens (generate's own min_new_tokens)
    model.generation_config.min_new_tokens = cfg["min_new_tokens"]
trainer = GRPOTrainer(model, tok, s, models.pick_device(device))
all_prompts = c.prompts(cfg)
opt = c.OptimizerSteps()
watch = c.ParamWatch(model)
eos = set(trainer.eos_ids)
ch.send(event="ready", setup_s=c.now() - t_setup, rss_mb=c.rss_mb(), threads=torch.get_num_threads(),
        versions=c.versions("torch", "transformers", "p2pswarm"),
        settings={"num_iterations": s.num_iterations, "micro_batch_size": s.micro_batch_size, "loss_type": s.loss_type,
                  "optimizer": type(trainer.optimizer).__name__, "gradient_checkpointing": s.gradient_checkpointing,
                  "decoder": "hf" if trainer.decoder.uses_hf else "ours", "decoder_compile": trainer.decoder.compile,
                  "device": device, "dtype": dtype, "params": sum(p.numel() for p in model.parameters())})

step = 0
while ch.recv() == "step":
    tasks = [Task(task_id=f"{step}:{i}", dataset="bench", question=m[-1]["content"], answer="", prompt=m)
             for i, m in enumerate(all_prompts[step])]
    watch.snapshot()
    n0 = opt.count
    t0 = c.now()
    groups = trainer.generate(tasks)
    t1 = c.now()
    for i, g in enumerate(groups):  # scoring is not timed (it is the same seeded reward on every side)
        g.rewards = [c.reward(seed, step, i, j) for j in range(len(g.completions))]
    state = GameState(step)
    state.add(0, groups, [])
    t2 = c.now()
    stats = trainer.train(state)
    t3 = c.now()
    lengths = [len(ids) for g in groups for ids in g.completion_ids]
    assert not stats.skipped and stats.local_groups == len(groups), stats
    rec = c.step_record(t1 - t0, t3 - t2, sum(lengths), len(lengths), max(lengths), opt.count - n0, watch.delta())
    if not trainer.decoder.uses_hf:  # our loop's own split: decoding steps alone, without prefill
        rec["decode_tokens_per_s"] = trainer.decoder.last["decode_tokens_per_s"]
    ch.send(**rec)
    step += 1

ch.send(event="done", peak_rss_mb=c.peak_rss_mb(), optimizer_steps=opt.count)
