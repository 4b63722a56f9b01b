"""Build the embedded default policy: a tiny Qwen2 causal LM warm-started on the `easy` preset.

The result ships inside the package at p2pswarm/assets/default_policy/ and loads with
AutoTokenizer / AutoModelForCausalLM.from_pretrained(folder), with no model hub involved.

Rerun (about 6 minutes on 2 idle CPU cores; the same seed and steps give the same weights, bit for bit):

    . .venv/bin/activate
    python scripts/build_default_policy.py                       # defaults: --steps 3000 --seed 0
    python scripts/build_default_policy.py --steps 200 --out /tmp/policy   # quick smoke build
    python scripts/build_default_policy.py --datasets basic_arithmetic,chain_sum --steps 600 --out /tmp/arith
                                                                 # a specialist (bench/hetero.py)

Steps, top to bottom:
  1. train a small BPE tokenizer (byte-level alphabet + merges, 512 ids, Qwen2's pre-tokenizer) on easy-preset
     prompts and answers
  2. wrap it for transformers (ChatML template, eos/pad) and check that a reloaded one gives the same ids
  3. build a tiny Qwen2ForCausalLM
  4. supervised warm start: chat prompt -> "<answer>{answer}</answer><|im_end|>" (--tagged-fraction of the
     examples) or "The answer is {answer}.<|im_end|>" (the rest), loss on the completion only
  5. greedy evaluation on the 200 held-out tasks, per dataset, and a letter_counting baseline
  6. save, reload and verify; write build_info.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import (  # noqa: E402
    AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers,
)
from transformers import (  # noqa: E402
    AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
)

from p2pswarm.data.reasoning_gym import ReasoningGymData, load_preset  # noqa: E402
from p2pswarm.rewards import rgym_score  # noqa: E402

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
# 3000 steps: the policy knows about 0.55 of the held-out answers (greedy, once it uses the tags: README)
parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of the supervised warm start")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", type=Path, default=REPO / "p2pswarm" / "assets" / "default_policy")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
# A specialist for heterogeneous swarms (bench/hetero.py): the warm start sees only these datasets of the
# preset. The tokenizer is still trained on all of them, so every specialist of one seed shares its ids.
parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine others are busy on)")
parser.add_argument("--datasets", default="", help="comma-separated datasets of the preset to warm-start on (default: all)")
# Like a general chat model, the warm start mostly answers in its own words ("The answer is 7."), which the
# reward does not read; only this fraction of its supervised answers use the <answer> tags. That is the
# headroom RL visibly closes in a few hundred rounds (bench/learning.py): greedy decoding answers untagged on
# most prompts, sampling finds the tags on some, and GRPO moves the whole policy to them. 1.0: always tagged.
parser.add_argument("--tagged-fraction", type=float, default=0.3,
                    help="share of the warm start's supervised answers written in <answer> tags (the rest in words)")
args = parser.parse_args()

PRESET = "easy"
VOCAB_SIZE = 512  # including the 3 special and 2 added tokens
TOKENIZER_TEXTS = 20_000  # training-stream tasks the tokenizer is trained on
MODEL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
MAX_POSITIONS = 512
WARMUP_STEPS = 100
MIN_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
MAX_NEW_TOKENS = 16
EVAL_BATCH = 50
LOG_EVERY = 100

# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# Qwen-style ChatML; apply_chat_template(..., add_generation_prompt=True) ends with "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

KNOWN_DATASETS = [spec["name"] for spec in load_preset(PRESET)]
WARM_DATASETS = [d.strip() for d in args.datasets.split(",") if d.strip()] or KNOWN_DATASETS
if unknown := sorted(set(WARM_DATASETS) - set(KNOWN_DATASETS)):
    parser.error(f"--datasets: {unknown} not in the {PRESET} preset ({', '.join(KNOWN_DATASETS)})")

t_build = time.time()
torch.set_flush_denormal(True)  # denormals made CPU training ~50x slower
torch.set_num_threads(args.threads)
transformers.utils.logging.disable_progress_bar()
torch.manual_seed(args.seed)
random.seed(args.seed)
out = args.out.resolve()
print(f"building the default policy into {out} (steps={args.steps}, seed={args.seed})")

data = ReasoningGymData(PRESET, seed=args.seed)
heldout = data.eval_tasks()
heldout_questions = {t.question for t in heldout}
rng = random.Random(args.seed)


def sample_warm(n: int) -> list:
    """n training-stream tasks of the warm-start datasets (rejection sampling keeps the preset's mix among them)."""
    out: list = []
    while len(out) < n:
        out += [t for t in data.sample_train(n, rng) if t.dataset in WARM_DATASETS]
    return out[:n]


def completion_text(task, tagged: bool = True) -> str:
    if not tagged:
        return f"The answer is {task.answer}.{IM_END}"
    return f"{ANSWER_OPEN}{task.answer}{ANSWER_CLOSE}{IM_END}"


format_rng = random.Random(args.seed + 1)  # its own stream: the tasks drawn do not depend on the fraction


def warm_format() -> bool:
    return format_rng.random() < args.tagged_fraction


def render(messages, add_generation_prompt=True) -> str:
    """The chat template by hand, for training the tokenizer before a transformers tokenizer exists."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# -----------------------------------------------------------------------------
# 1. tokenizer: BPE over a byte-level alphabet (any text encodes, nothing is <unk>), with Qwen2's exact
# normalizer and pre-tokenizer (digits split one by one). Why Qwen2's: transformers 5 lists "qwen2" among the
# models whose hub tokenizer_class is "incorrect", so AutoTokenizer on a qwen2 folder ALWAYS builds a
# Qwen2Tokenizer, whatever tokenizer_config.json says, and that class takes only the vocab and merges from
# tokenizer.json and installs its own NFC + Split(regex) + ByteLevel. A tokenizer trained with that very
# pipeline gives the same ids whichever class loads it (checked in step 2).

tok_tasks = data.sample_train(TOKENIZER_TEXTS, rng)
tok_corpus = ([render(data.messages(t)) for t in tok_tasks] + [completion_text(t) for t in tok_tasks]
              + [completion_text(t, tagged=False) for t in tok_tasks])

bpe = Tokenizer(models.BPE())
bpe.normalizer = normalizers.NFC()
bpe.pre_tokenizer = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
)
bpe.decoder = decoders.ByteLevel()
bpe.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (PAD, IM_START, IM_END)])
# <answer> tags are ordinary (non-special) added tokens: one id each, and they survive skip_special_tokens=True.
trainer = trainers.BpeTrainer(
    vocab_size=VOCAB_SIZE - 2,
    special_tokens=[PAD, IM_START, IM_END],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
bpe.train_from_iterator(tok_corpus, trainer)
bpe.add_tokens([AddedToken(s, special=False, normalized=False) for s in (ANSWER_OPEN, ANSWER_CLOSE)])
assert bpe.get_vocab_size() == VOCAB_SIZE, bpe.get_vocab_size()

# -----------------------------------------------------------------------------
# 2. the transformers tokenizer: a generic fast tokenizer over our tokenizer.json. AutoTokenizer (transformers 5)
# loads it back as a Qwen2Tokenizer anyway (see step 1); older versions and PreTrainedTokenizerFast honour
# tokenizer_class. Both loaders are checked against the trained BPE, id for id.

tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=bpe,
    eos_token=IM_END,
    pad_token=PAD,
    chat_template=CHAT_TEMPLATE,
    model_max_length=MAX_POSITIONS,
    padding_side="left",  # decoder-only: batched generation needs left padding
    clean_up_tokenization_spaces=False,  # or decode would eat spaces before punctuation
)
PAD_ID, IM_END_ID = tokenizer.convert_tokens_to_ids(PAD), tokenizer.convert_tokens_to_ids(IM_END)
IM_START_ID = tokenizer.convert_tokens_to_ids(IM_START)


def save_tokenizer(tok, folder: Path) -> None:
    tok.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # honoured by transformers 4; 5 uses Qwen2Tokenizer
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def check_tokenizer(loaded, tasks) -> None:
    """The reloaded tokenizer is ours: the trained BPE's pipeline and ids, exact round trips, the chat template."""
    assert loaded.is_fast, type(loaded)
    ours, theirs = json.loads(bpe.to_str()), json.loads(loaded.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        assert ours[part] == theirs[part], (type(loaded).__name__, part, theirs[part])
    for text in ("Hello,  world!\n\n  (x) -> y. It's 2024: 12+34=46 à ë", STRESS_TEXT):
        assert loaded(text, add_special_tokens=False)["input_ids"] == bpe.encode(text, add_special_tokens=False).ids
    assert loaded.eos_token_id == IM_END_ID and loaded.pad_token_id == PAD_ID
    assert len(loaded) == VOCAB_SIZE, len(loaded)
    for t in tasks:
        prompt = loaded.apply_chat_template(data.messages(t), add_generation_prompt=True, tokenize=False)
        assert prompt == render(data.messages(t)), (prompt, render(data.messages(t)))
        for text in (prompt, completion_text(t), t.question, t.answer):
            ids = loaded(text, add_special_tokens=False)["input_ids"]
            assert ids == bpe.encode(text, add_special_tokens=False).ids, text
            assert loaded.decode(ids, skip_special_tokens=False) == text, text
    ids = loaded(completion_text(tasks[0]), add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == f"{ANSWER_OPEN}{tasks[0].answer}{ANSWER_CLOSE}"


STRESS_TEXT = "We'll SEE: naïve café \t tabs\r\n 3.14159 <answer> -7 </answer>x日本語 😀"
check_tasks = heldout + tok_tasks[:200]
with tempfile.TemporaryDirectory() as tmp:
    # with a qwen2 config next to it, as in the final folder
    Qwen2Config(vocab_size=VOCAB_SIZE, **MODEL).save_pretrained(tmp)
    save_tokenizer(tokenizer, Path(tmp))
    check_tokenizer(AutoTokenizer.from_pretrained(tmp), check_tasks)  # a Qwen2Tokenizer in transformers 5
    check_tokenizer(PreTrainedTokenizerFast.from_pretrained(tmp), check_tasks)  # tokenizer.json as saved

prompt_lens = [len(bpe.encode(render(data.messages(t))).ids) for t in heldout]
print(
    f"tokenizer: {VOCAB_SIZE} ids, prompt tokens mean {statistics.mean(prompt_lens):.1f} "
    f"(min {min(prompt_lens)}, max {max(prompt_lens)})"
)

# -----------------------------------------------------------------------------
# 3. model

config = Qwen2Config(
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=MAX_POSITIONS,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=IM_START_ID,
    eos_token_id=IM_END_ID,
    pad_token_id=PAD_ID,
    use_sliding_window=False,
    dtype="float32",
    **MODEL,
)
model = Qwen2ForCausalLM(config)
n_params = sum(p.numel() for p in model.parameters())
print(f"model: {n_params:,} parameters")
model.generation_config.eos_token_id = IM_END_ID
model.generation_config.pad_token_id = PAD_ID
model.generation_config.bos_token_id = IM_START_ID

# -----------------------------------------------------------------------------
# 4. supervised warm start on the training stream (never the held-out questions)


def encode_example(task) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(data.messages(task), add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion_text(task, warm_format()), add_special_tokens=False)["input_ids"]
    return p_ids + c_ids, [-100] * len(p_ids) + c_ids  # loss on the completion tokens only


def make_batch(tasks):
    examples = [encode_example(t) for t in tasks]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), PAD_ID)
    labels = torch.full((len(examples), width), -100)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):  # right padding for training
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return input_ids, attention, labels


@torch.no_grad()
def evaluate(model, tokenizer, tasks) -> list[str]:
    """Greedy completions (batched, left padding), decoded with skip_special_tokens=True."""
    model.eval()
    tokenizer.padding_side = "left"
    outs = []
    for i in range(0, len(tasks), EVAL_BATCH):
        chunk = tasks[i : i + EVAL_BATCH]
        prompts = [
            tokenizer.apply_chat_template(data.messages(t), add_generation_prompt=True, tokenize=False) for t in chunk
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=IM_END_ID, pad_token_id=PAD_ID
        )
        outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train()
    return outs


def score(tasks, completions) -> tuple[float, dict[str, float]]:
    per = defaultdict(list)
    for t, c in zip(tasks, completions):
        per[t.dataset].append(rgym_score(t, c))
    mean = statistics.mean(s for v in per.values() for s in v)
    return mean, {k: round(statistics.mean(v), 4) for k, v in sorted(per.items())}


optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)


def lr_at(step: int) -> float:  # linear warmup, cosine decay to MIN_LR_FRACTION
    if step < WARMUP_STEPS:
        return args.lr * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, args.steps - WARMUP_STEPS)
    return args.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


model.train()
t_train = time.time()
losses = []
for step in range(args.steps):
    batch_tasks = sample_warm(args.batch_size)
    assert not any(t.question in heldout_questions for t in batch_tasks)
    input_ids, attention, labels = make_batch(batch_tasks)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step)
    loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    losses.append(loss.item())
    if (step + 1) % LOG_EVERY == 0 or step == 0:
        print(
            f"step {step + 1:5d}/{args.steps}  loss {statistics.mean(losses[-LOG_EVERY:]):.4f}  "
            f"lr {lr_at(step):.2e}  {time.time() - t_train:6.1f}s"
        )
    if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
        mean, _ = score(heldout, evaluate(model, tokenizer, heldout))
        print(f"step {step + 1:5d}  held-out mean score {mean:.3f}")
train_seconds = time.time() - t_train

# -----------------------------------------------------------------------------
# 5. evaluation on the held-out split

completions = evaluate(model, tokenizer, heldout)
mean_score, per_dataset = score(heldout, completions)
# baseline: always answer letter_counting's most common training-stream answer
lc_train = Counter(t.answer for t in tok_tasks if t.dataset == "letter_counting")
lc_answer = lc_train.most_common(1)[0][0]
lc_heldout = [t for t in heldout if t.dataset == "letter_counting"]
lc_baseline = statistics.mean(rgym_score(t, f"{ANSWER_OPEN}{lc_answer}{ANSWER_CLOSE}") for t in lc_heldout)
print(f"held-out mean score {mean_score:.3f} over {len(heldout)} tasks")
for name, s in per_dataset.items():
    print(f"  {name:18s} {s:.3f}")
print(f"letter_counting baseline (always {lc_answer!r}): {lc_baseline:.3f}")
for t, c in list(zip(heldout, completions))[:8]:
    print(f"  {t.dataset:17s} answer {t.answer!r:8s} completion {c!r}")

# -----------------------------------------------------------------------------
# 6. save, reload, verify, build_info.json

out.mkdir(parents=True, exist_ok=True)
for old in out.iterdir():  # a clean folder: no stale files from an earlier build
    if old.is_file():
        old.unlink()
model.save_pretrained(out, safe_serialization=True)
save_tokenizer(tokenizer, out)
for f in out.iterdir():
    f.chmod(0o644)  # safetensors writes its file 0600; package data must be world-readable
(REPO / "p2pswarm" / "assets" / "__init__.py").touch()

tok2 = AutoTokenizer.from_pretrained(out)
model2 = AutoModelForCausalLM.from_pretrained(out)
check_tokenizer(tok2, check_tasks)
assert isinstance(model2, Qwen2ForCausalLM) and model2.dtype == torch.float32
assert model2.config.eos_token_id == IM_END_ID and model2.config.pad_token_id == PAD_ID
assert model2.generation_config.eos_token_id == IM_END_ID, model2.generation_config.eos_token_id
assert model2.generation_config.pad_token_id == PAD_ID
for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
    assert torch.equal(a, b)
# the reloaded pair gives the same greedy answers
assert evaluate(model2, tok2, heldout[:EVAL_BATCH]) == completions[:EVAL_BATCH]
# batched sampling, as the RL trainer does it
tok2.padding_side = "left"
prompts = [tok2.apply_chat_template(data.messages(t), add_generation_prompt=True, tokenize=False) for t in heldout[:3]]
enc = tok2(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
torch.manual_seed(args.seed)
gen = model2.generate(**enc, do_sample=True, num_return_sequences=4, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0)
assert gen.shape[0] == 12, gen.shape
samples = tok2.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
assert any(ANSWER_OPEN in s for s in samples), samples
ids = tok2("<answer>7</answer><|im_end|>", add_special_tokens=False)["input_ids"]
assert tok2.decode(ids, skip_special_tokens=True) == "<answer>7</answer>"

size_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
info = {
    "parameters": n_params,
    "size_bytes": size_bytes,  # the model and tokenizer files, build_info.json excluded
    "vocab_size": VOCAB_SIZE,
    "model": {**MODEL, "max_position_embeddings": MAX_POSITIONS, "tie_word_embeddings": True},
    "preset": PRESET,
    "datasets": WARM_DATASETS,
    "steps": args.steps,
    "tagged_fraction": args.tagged_fraction,
    "batch_size": args.batch_size,
    "lr": args.lr,
    "seed": args.seed,
    "train_seconds": round(train_seconds, 1),
    "build_seconds": round(time.time() - t_build, 1),
    "final_train_loss": round(statistics.mean(losses[-LOG_EVERY:]), 4),
    "prompt_tokens_mean": round(statistics.mean(prompt_lens), 1),
    "heldout_tasks": len(heldout),
    "heldout_mean_score": round(mean_score, 4),
    "heldout_score_per_dataset": per_dataset,
    "letter_counting_baseline": {"answer": lc_answer, "exact_match": round(lc_baseline, 4)},
    "command": "python " + shlex.join(["scripts/build_default_policy.py", *sys.argv[1:]]),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
}
(out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
print(f"saved {out} ({size_bytes / 1e6:.2f} MB) in {info['build_seconds']:.0f}s")
print(json.dumps(info, indent=2))
