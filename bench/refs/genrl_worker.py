"""Trainer-speed worker (b): Gensyn GenRL's GRPOLanguageTrainerModule, in bench/.venv-genrl (gensyn-genrl==0.3.0).
See _common.py for the protocol.

GenRL's own methods are called directly (its round loop swallows exceptions raised by train):
  generate: trainer.generate(inputs)  (GenRL loops num_generations times over one batched generate of the 8 prompts)
  train:    trainer.train(state, data_manager, reward_manager)  (re-tokenises the completion texts, computes old
            log-probs, then optimizer steps over minibatches)
Settings matched to the other two sides: ppo_epochs = 1 and minibatch_size = 8 x G (one optimizer step over the
whole batch; GenRL has no gradient accumulation), gradient checkpointing off (GenRL's default is on), beta = 0.
The state / data manager / reward manager are minimal stand-ins exposing exactly what GRPOLanguageTrainerModule.train
reads (GameState.stage, get_stage_state, get_stage_actions; DataManager.prepare_input; RewardManager[stage]).
"""

from __future__ import annotations

import tempfile

import _common as c

cfg = c.config()
ch = c.Channel()
t_setup = c.now()
torch = c.setup_torch(cfg)

from genrl.trainer.grpo_trainer import GRPOLanguageTrainerModule, GRPOTrainerConfig  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

G, seed, n_prompts = cfg["G"], cfg["seed"], cfg["prompts"]


class StageState:
    """What GRPOLanguageTrainerModule.train/step read from genrl.state.GameState: one agent, one stage."""

    def __init__(self, prompts: list, completions: list[list[str]]):
        self.stage = 1  # train() loops over range(state.stage)
        self.prompts, self.completions = prompts, completions

    def get_stage_state(self, stage: int):
        return self.prompts

    def get_stage_actions(self, stage: int):
        return {0: {i: {0: comps} for i, comps in enumerate(self.completions)}}  # [agent][batch item][node]


class DataManager:
    def prepare_input(self, stage_inputs, stage: int):
        return [{"prompt": m} for m in stage_inputs], [(0, i, 0) for i in range(len(stage_inputs))]


class RewardManager:
    def __init__(self, rewards: list[list[float]]):
        self.rewards = rewards

    def __getitem__(self, stage: int):
        return {0: {i: {0: r} for i, r in enumerate(self.rewards)}}


torch.manual_seed(seed)
dtype = cfg.get("dtype", "float32")  # GenRL picks CUDA itself when it sees one
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=getattr(torch, dtype))
conf = GRPOTrainerConfig(
    epsilon=0.2, epsilon_high=0.28, beta=0.0, temperature=1.0, top_p=1.0, dtype=dtype,
    enable_gradient_checkpointing=cfg.get("gradient_checkpointing", False), max_new_tokens=cfg["max_new_tokens"], num_generations=G,
    learning_rate=cfg["lr"], ppo_epochs=1, minibatch_size=n_prompts * G,
)
# processing_class left out: GenRL loads the tokenizer itself from model.config._name_or_path (the local folder).
trainer = GRPOLanguageTrainerModule([model], conf, log_dir=tempfile.mkdtemp())
tok = trainer.processing_class
if cfg["min_new_tokens"]:  # fixed-length mode: eos is masked until max_new_tokens (generate's own min_new_tokens)
    trainer.generation_config.min_new_tokens = cfg["min_new_tokens"]
all_prompts = c.prompts(cfg)
opt = c.OptimizerSteps()
watch = c.ParamWatch(trainer.model)
eos = {tok.eos_token_id}
ch.send(event="ready", setup_s=c.now() - t_setup, rss_mb=c.rss_mb(), threads=torch.get_num_threads(),
        versions=c.versions("torch", "transformers", "gensyn-genrl"),
        settings={"ppo_epochs": conf.ppo_epochs, "minibatch_size": conf.minibatch_size,
                  "optimizer": type(trainer.optimizer).__name__,
                  "gradient_checkpointing": conf.enable_gradient_checkpointing})

step = 0
while ch.recv() == "step":
    prompts = all_prompts[step]
    inputs = [{"prompt": m} for m in prompts]
    watch.snapshot()
    n0 = opt.count
    t0 = c.now()
    completions, completion_ids = trainer.generate(inputs, return_completion_ids=True)
    t1 = c.now()
    rewards = [[c.reward(seed, step, i, j) for j in range(len(comps))] for i, comps in enumerate(completions)]
    state, dm, rm = StageState(prompts, completions), DataManager(), RewardManager(rewards)
    t2 = c.now()
    trainer.train(state, dm, rm)
    t3 = c.now()
    lengths = [c.completion_length(ids.tolist(), eos) for per_prompt in completion_ids for ids in per_prompt]
    ch.send(**c.step_record(t1 - t0, t3 - t2, sum(lengths), len(lengths), max(lengths), opt.count - n0, watch.delta()))
    step += 1

ch.send(event="done", peak_rss_mb=c.peak_rss_mb(), optimizer_steps=opt.count)
