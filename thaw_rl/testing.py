"""Tiny tokenizers and models for tests, built in code (no hub, no files).

`tiny_tokenizer()` is a character-level `PreTrainedTokenizerFast`: one token per character of
digits, letters, punctuation, space and newline, plus the special tokens below, and a ChatML chat
template, so `apply_chat_template` and TRL's chat handling work.

    id 0 <pad>   id 1 <|im_start|> (bos)   id 2 <|im_end|> (eos)   id 3 <unk>   ids 4.. characters

`tiny_model(family)` is a random causal LM of a real architecture, small enough to run a forward in
milliseconds on CPU. Supported families:

    "llama"  LlamaForCausalLM   untied lm_head (as Llama-3-8B)
    "qwen2"  Qwen2ForCausalLM   q/k/v biases, tied embeddings (as Qwen2.5-0.5B/1.5B)
    "qwen3"  Qwen3ForCausalLM   q/k RMSNorm, explicit head_dim, tied embeddings (as Qwen3-0.6B)

All three: 3 layers, hidden 64, 4 query heads and 2 KV heads (GQA) of head_dim 16, intermediate 128,
vocab = the tiny tokenizer's 100, 256 positions, sdpa attention, eval mode. The biases and norm
weights, which HF initializes to 0 and 1, are randomized too, so a path that skips them shows up.
The same seed gives the same weights in any dtype (weights are made in fp32, then cast), and the
global RNG is left as it was. Override any config field: `tiny_model("qwen3", num_hidden_layers=5)`.

`trl_rows` and `trl_flat_logps` are TRL 1.16's padded layout and its flat scoring call, the reference the
shared-prefix tests and the packed_training / fidelity benchmarks compare against.
"""

from __future__ import annotations

import string

import torch

PAD, IM_START, IM_END, UNK = "<pad>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, UNK)
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " \n"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_FAMILIES = ("llama", "qwen2", "qwen3")

_COMMON_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    initializer_range=0.02,
    attention_dropout=0.0,
)
_FAMILY_CONFIG = {
    "llama": dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                  attention_bias=False, mlp_bias=False),
    "qwen2": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  use_sliding_window=False),
    "qwen3": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  head_dim=16, attention_bias=False, use_sliding_window=False),
}


def tiny_vocab() -> dict[str, int]:
    """Token -> id: the special tokens, then one token per character."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}


def tiny_tokenizer():
    """A character-level PreTrainedTokenizerFast with ChatML specials and template (left padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=tiny_vocab(), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char each
    backend.decoder = decoders.Fuse()  # concatenate, no spaces between characters
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=_COMMON_CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(family: str, **config_overrides):
    """The transformers config of a tiny `family` model; keyword arguments override fields."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    config_classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if family not in config_classes:
        raise ValueError(f"tiny_model family must be one of {TINY_FAMILIES}, got {family!r}")
    vocab = tiny_vocab()
    fields = dict(_COMMON_CONFIG, **_FAMILY_CONFIG[family])
    fields.update(vocab_size=len(vocab), bos_token_id=vocab[IM_START], eos_token_id=vocab[IM_END],
                  pad_token_id=vocab[PAD])
    fields.update(config_overrides)
    return config_classes[family](**fields)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A random tiny causal LM of `family` ("llama", "qwen2", "qwen3"), eval mode, on CPU."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        _randomize_biases_and_norms(model)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.to(dtype).eval()


def tiny_model_and_tokenizer(family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                             **config_overrides):
    """(tiny_model(family, ...), tiny_tokenizer())."""
    return tiny_model(family, seed, dtype, **config_overrides), tiny_tokenizer()


@torch.no_grad()
def _randomize_biases_and_norms(model) -> None:
    """HF initializes biases to 0 and RMSNorm weights to 1, which would hide code that skips them."""
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, 0.1)
        elif "norm" in name:
            param.normal_(1.0, 0.1)


def hf_greedy(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """The reference continuation: ``model.generate``, greedy, one prompt at a time (no padding involved)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    """One random prompt per length, token ids in [3, vocab) (clear of the tiny tokenizer's pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def trl_rows(prompts: list[list[int]], completions: list[list[int]], completion_width: int, pad: int = 0,
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's layout: left-padded prompts, right-padded completions -> (input_ids, attention_mask) (B, L)."""
    width = max(len(p) for p in prompts)
    ids, mask = [], []
    for p, c in zip(prompts, completions):
        ids.append([pad] * (width - len(p)) + p + c + [pad] * (completion_width - len(c)))
        mask.append([0] * (width - len(p)) + [1] * len(p) + [1] * len(c) + [0] * (completion_width - len(c)))
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def trl_flat_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int):
    """TRL 1.16's flat scoring call (``_get_per_token_logps_and_entropies``'s body for one chunk) on a model
    with TRL's fused LM head: (log-probs, entropies or None), each ``(B, completion_width)``."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-completion_width] = -100
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    entropy = None if out.entropy is None else out.entropy[:, -completion_width:]
    return out.log_probs[:, -completion_width:], entropy


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a test's torch.distributed rendezvous (``--master_port``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_ranks(worker, out_dir, nproc: int = 2, timeout: int = 400) -> list[dict]:
    """Run ``worker OUT_DIR`` under torchrun on ``nproc`` CPU ranks (gloo, one thread each) and return each
    rank's ``OUT_DIR/rank<r>.json``; a failed run raises with the end of its output."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(worker), str(out_dir)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"torchrun {Path(worker).name} failed ({out.returncode}):\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(nproc)]
