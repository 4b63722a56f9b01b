"""FusedLM (p2pswarm/fastlm.py) computes what the HF model computes: logits, gradients, sampled tokens, updates."""

import copy

import pytest
import torch

from helpers import make_settings
from p2pswarm.decoding import Decoder
from p2pswarm import fastlm
from p2pswarm.fastlm import FusedLM
from p2pswarm.trainer import GRPOTrainer
from p2pswarm.types import Group
from test_decoding import cut, prompts, tiny_gpt2
from test_trainer import tasks_with_prompts


def tiny(kind):
    """A small random model of another supported family (Llama with attention biases off, Mistral)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    if kind == "llama-biased":  # biases on q, k, v and o, as attention_bias=True gives
        return LlamaForCausalLM(LlamaConfig(**common, attention_bias=True)).eval()
    return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()


def shared_batch(seed=0):
    """3 prompts of different lengths (left-padded), each followed by 2-3 completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lens, P, C = [9, 17, 4], 17, 11
    pid = torch.zeros(3, P, dtype=torch.long)
    pm = torch.zeros(3, P, dtype=torch.long)
    for i, n in enumerate(lens):
        pid[i, P - n:] = torch.randint(3, 512, (n,), generator=g)
        pm[i, P - n:] = 1
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    cid = torch.randint(3, 512, (len(owner), C), generator=g)
    cm = torch.ones_like(cid)
    for r, n in enumerate([11, 3, 7, 11, 1, 5, 9]):
        cid[r, n:], cm[r, n:] = 0, 0
    return pid, pm, cid, cm, owner


@pytest.mark.parametrize("kind", ["qwen2", "llama", "llama-biased", "mistral", "qwen2-mlp-apart", "llama-mlp-apart"])
def test_the_shared_prompt_training_forward_gives_hfs_logits_and_gradients(fresh_policy, kind, monkeypatch):
    """qwen2 (the embedded policy) ties its input and output embeddings, llama does not; "-mlp-apart": gate and
    up as two matmuls, as for models past FUSE_MLP_MAX (a 0.5B one)."""
    if kind.endswith("-mlp-apart"):
        monkeypatch.setattr(fastlm, "FUSE_MLP_MAX", 0)
        kind = kind.removesuffix("-mlp-apart")
    model = fresh_policy[0] if kind == "qwen2" else tiny(kind)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (kind == "qwen2")
    model.train()
    pid, pm, cid, cm, owner = shared_batch()
    ids, attn = torch.cat([pid[owner], cid], 1), torch.cat([pm[owner], cm], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    weight = torch.randn(*cid.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    got = {}
    for name in ("hf", "fused"):
        model.zero_grad()
        if name == "hf":
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=cid.shape[1] + 1,
                           use_cache=False).logits[:, :-1]
        else:
            logits = FusedLM(model).forward_shared(pid, pm, cid, owner)
        (logits * weight)[cm.bool()].sum().backward()
        got[name] = (logits.detach()[cm.bool()], {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(got["fused"][0], got["hf"][0], atol=1e-4), (got["fused"][0] - got["hf"][0]).abs().max()
    for n, g in got["hf"][1].items():
        assert torch.allclose(got["fused"][1][n], g, atol=1e-5 * max(1.0, g.abs().max().item())), n


@pytest.mark.parametrize("kind", ["qwen2", "llama", "llama-biased", "mistral", "qwen2-mlp-apart", "qwen2-packed",
                                  "llama-biased-packed", "qwen2-mlp-apart-packed"])
def test_fused_greedy_decoding_equals_hf_generate(tmp_path, fresh_policy, kind, monkeypatch):
    """"-mlp-apart": gate and up as two matmuls; "-packed": every weight in oneDNN's packed layout, as for a
    0.5B model on the CPU (PACK_MIN)."""
    if kind.endswith("-packed"):
        if not fastlm._packing_works():
            pytest.skip("this torch build has no oneDNN packed linear")
        monkeypatch.setattr(fastlm, "PACK_MIN", 0)
        kind = kind.removesuffix("-packed")
    if kind.endswith("-mlp-apart"):
        monkeypatch.setattr(fastlm, "FUSE_MLP_MAX", 0)
        kind = kind.removesuffix("-mlp-apart")
    model, tok = fresh_policy
    if kind != "qwen2":
        model = tiny(kind)
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path, max_new_tokens=20))
    _, enc = prompts(trainer, 6)
    dec = Decoder(model, trainer.eos_ids, tok.pad_token_id, choice="ours", compile="off")
    assert dec.path == "fused"
    packed = isinstance(dec.fused.bind().layers[0].wqkv, fastlm._Packed)
    assert packed == (fastlm.PACK_MIN == 0) and (dec.fused.head is not None) == packed
    got = dec.generate(enc["input_ids"], enc["attention_mask"], n=2, max_new_tokens=20, greedy=True).tolist()
    twice = {k: v.repeat_interleave(2, 0) for k, v in enc.items()}  # n=2: each prompt's cache copied in our loop
    want = model.generate(**twice, max_new_tokens=20, do_sample=False, temperature=None, top_p=None, top_k=None,
                          pad_token_id=tok.pad_token_id, eos_token_id=trainer.eos_ids)[:, enc["input_ids"].shape[1]:]
    eos = set(trainer.eos_ids)
    assert [cut(r, eos) for r in got] == [cut(r, eos) for r in want.tolist()]


def test_models_it_cannot_run_say_why_and_keep_hfs_forward(tmp_path, fresh_policy):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model, tok = fresh_policy
    assert FusedLM.supports(model) is None
    gpt2 = tiny_gpt2(len(tok))
    assert "gpt2" in FusedLM.supports(gpt2)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert "qwen3" in FusedLM.supports(qwen3)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    windowed = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                                            sliding_window=8, max_window_layers=1))
    assert "sliding" in FusedLM.supports(windowed)
    assert Decoder(gpt2, [2], 0, choice="ours", compile="off").path == "static-cache"
    trainer = GRPOTrainer(gpt2, tok, make_settings(tmp_path))
    assert trainer.fused is None and trainer.decoder.path == "static-cache"
    checkpointed = GRPOTrainer(model, tok, make_settings(tmp_path, gradient_checkpointing=True))
    assert checkpointed.fused is None  # HF's per-layer recomputation is what that setting asks for


def test_a_training_step_updates_the_weights_as_hfs_forward_would(tmp_path, fresh_policy):
    """The same groups (two peers' prompts, G=3, uneven lengths), one optimizer step with the fused forward and
    one with fused_forward=off, from the same weights: the same new weights."""
    model, tok = fresh_policy
    tasks = tasks_with_prompts(3)
    groups = [Group(t, ["", "", ""], peer=p, rewards=[0.0, 1.0, 0.5],
                    completion_ids=[[5 + i, 9, 2], [7] * (4 + i) + [2], [11, 12, 13, 14, 15, 16, 17]])
              for i, (t, p) in enumerate(zip(tasks, ["me", "cat", "me"]))]
    after = {}
    for mode in ("auto", "off"):
        m = copy.deepcopy(model)
        trainer = GRPOTrainer(m, tok, make_settings(tmp_path, fused_forward=mode, micro_batch_size=4,
                                                    num_generations=3, learning_rate=1e-3))
        assert (trainer.fused is not None) == (mode == "auto")
        b = trainer._batch(groups)
        loss = []
        for sl in (slice(0, 4), slice(4, 9)):  # micro-batches that split a group: its prompt computed in both
            logp = trainer._logprobs(m, b, sl)
            loss.append(-(logp * b["mask"][sl] * b["advantages"][sl, None]).sum())
        sum(loss).backward()
        trainer.optimizer.step()
        after[mode] = {n: p.detach().clone() for n, p in m.named_parameters()}
    moved = 0
    for n, p in after["off"].items():
        assert torch.allclose(after["auto"][n], p, atol=1e-6), n
        moved += not torch.equal(p, dict(model.named_parameters())[n])
    assert moved > 10  # the step changed the weights, so equal weights mean equal updates


def test_bfloat16_runs_through_the_fused_path_as_hf_does(tmp_path, fresh_policy):
    """The dtype GPUs train in: no complex bfloat16 exists, so the rotation runs in float32; logits stay within
    bfloat16's rounding of HF's, and a sampled batch trains."""
    model, tok = fresh_policy
    model = model.to(torch.bfloat16)
    pid, pm, cid, cm, owner = shared_batch()
    ids, attn = torch.cat([pid[owner], cid], 1), torch.cat([pm[owner], cm], 1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                     logits_to_keep=cid.shape[1] + 1, use_cache=False).logits[:, :-1].float()
        got = FusedLM(model).forward_shared(pid, pm, cid, owner).float()
    assert got.dtype == want.dtype and (got - want)[cm.bool()].abs().max() < 0.1 * want.abs().max()
    trainer = GRPOTrainer(model, tok, make_settings(tmp_path, num_generations=2, max_new_tokens=8))
    assert trainer.decoder.path == "fused" and trainer.fused is not None
    groups = trainer.generate(tasks_with_prompts(2))
    for g in groups:
        g.rewards = [0.0, 1.0]
    before = model.lm_head.weight.detach().clone()
    trainer.selector.select = lambda state: (groups, [])
    assert not trainer.train(None).skipped
    assert not torch.equal(before, model.lm_head.weight)
