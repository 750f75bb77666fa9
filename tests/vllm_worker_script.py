"""Checks of VLLMBackend against the real vLLM engine, run as a script (vLLM must start under ``__main__``).

``python tests/vllm_worker_script.py CHECK[,CHECK...] --out result.json`` starts one vLLM engine on
SmolLM2-135M-Instruct (fp32) and runs the named checks on it, writing what each measured to the JSON
file; ``tests/test_vllm_backend.py`` asserts on that file. Checks:

- ``greedy``: greedy tokens and logprobs of VLLMBackend vs the native engine on several prompts.
- ``sampler``: TreeSampler (grpo and segments specs) on VLLMBackend; every request's num_cached_tokens.
- ``weights``: update_weights with perturbed weights changes the outputs; the originals bring them back.
- ``misses``: a prefix-cache reset between prefill and generate is counted as misses (and raises if strict).
- ``trainer``: ThawGRPOTrainer(rollout_backend="vllm") trains 2 steps (builds its own engine; run alone).
- ``bad_model``: a model directory vLLM cannot load gives thaw-rl's ValueError (no engine starts).

This file defines no tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

BLOCK_SIZE = 32
KV_BYTES = 256 << 20
STORY = ("A lighthouse keeper on a small island keeps a logbook of every ship that passes. One stormy night "
         "the lamp fails, and she must decide whether to row to the mainland for parts or repair it herself.")
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain recursion to a child in two sentences.", "List three prime numbers and say why they are prime."]


def chat_prompts(tokenizer, questions=QUESTIONS) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in questions]


def build_backend(**kwargs):
    from thaw_rl.backends.vllm_backend import VLLMBackend
    from thaw_rl.offline_models import smollm2_cache_path

    start = time.perf_counter()
    backend = VLLMBackend(smollm2_cache_path(), dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory_bytes=KV_BYTES,
                          enforce_eager=True, max_model_len=1024, **kwargs)
    return backend, time.perf_counter() - start


def check_greedy(backend, model, tokenizer) -> dict:
    """Greedy 36 tokens (ignore_eos, so every prompt gives 36) on both backends, token for token."""
    from thaw_rl import NativeBackend, SamplingParams

    prompts = chat_prompts(tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=36, ignore_eos=True)
    native = NativeBackend(model, tokenizer, block_size=16)
    ours = native.generate(native.prefill(prompts), params)
    theirs = backend.generate(backend.prefill(prompts), params)
    rows = []
    for a, b in zip(ours, theirs):
        agree = _agree(a.token_ids, b.token_ids)
        diffs = [abs(x - y) for x, y in zip(a.logprobs[:agree], b.logprobs[:agree])]
        rows.append({"native": a.token_ids, "vllm": b.token_ids, "agree": agree,
                     "max_logprob_diff": max(diffs, default=0.0), "num_cached_tokens": b.num_cached_tokens})
    return {"rows": rows}


def check_sampler(backend, model, tokenizer) -> dict:
    """grpo(4) and segments([2, 2], 8 tokens) trees; each request's cache hit against the trunk's full blocks."""
    import torch

    from thaw_rl import SamplingParams, TreeSampler, TreeSpec

    requests = []
    generate = backend.generate

    def recording_generate(handles, params):
        expected = [backend.expected_cached_tokens(h) for h in handles]
        lengths = [h.num_tokens for h in handles]
        outs = generate(handles, params)
        requests.extend({"tokens": n, "expected": e, "cached": o.num_cached_tokens}
                        for n, e, o in zip(lengths, expected, outs))
        return outs

    backend.generate = recording_generate
    prompts = chat_prompts(tokenizer, [f"{STORY} {q}" for q in QUESTIONS[:2]])  # 2-3 full blocks each
    out = {"prompt_lengths": [len(p) for p in prompts]}
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=7)
    for name, spec in [("grpo", TreeSpec.grpo(4)), ("segments", TreeSpec.segments([2, 2], 8))]:
        requests.clear()
        before = backend.counters()
        batch = TreeSampler(backend, spec).rollout(prompts, params)
        after = backend.counters()
        leaf = batch.leaves[0]
        with torch.no_grad():
            logits = model(torch.tensor([leaf.prompt_ids + leaf.completion_ids])).logits[0].float()  # (L, V)
        lp = torch.log_softmax(logits, -1)[len(leaf.prompt_ids) - 1:-1]  # (C, V)
        hf = lp.gather(-1, torch.tensor(leaf.completion_ids)[:, None])[:, 0].tolist()
        out[name] = {
            "num_leaves": len(batch.leaves), "leaves_per_prompt": batch.num_leaves_per_prompt,
            "completion_lengths": [len(x.completion_ids) for x in batch.leaves],
            "requests": list(requests),
            "misses": after["num_prefix_cache_misses"] - before["num_prefix_cache_misses"],
            "stats": {k: getattr(batch.stats, k) for k in ("prefill_tokens", "decode_tokens", "reused_tokens",
                                                           "sampled_tokens", "num_forks", "completion_tokens")},
            "max_sampling_logprob_diff_vs_hf": max(abs(a - b) for a, b in zip(hf, leaf.logprobs)),
            "entropies_nan": all(math.isnan(e) for x in batch.leaves for e in x.entropies),
            "distinct_completions": len({tuple(x.completion_ids) for x in batch.leaves}),
        }
    backend.generate = generate
    # entropy_top_k: entropies from the top-20 processed logprobs, a lower bound of the true entropy
    backend.entropy_top_k = 20
    leaf = backend.generate(backend.prefill(prompts[:1]), SamplingParams(temperature=1.0, max_tokens=8, seed=5))[0]
    backend.entropy_top_k = 0
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0] + leaf.token_ids])).logits[0].float()  # (L, V)
    lp = torch.log_softmax(logits, -1)[len(prompts[0]) - 1:-1]  # (C, V)
    out["entropy_top_k"] = {"vllm": leaf.entropies, "hf": (-(lp.exp() * lp).sum(-1)).tolist()}
    return out


def check_weights(backend, model, tokenizer) -> dict:
    """Perturbed weights (every matrix, the tied embedding included) change vLLM's greedy output to what the
    native engine gives on the same weights; loading the originals back restores the first output exactly."""
    import torch

    from thaw_rl import NativeBackend, SamplingParams

    prompts = chat_prompts(tokenizer, QUESTIONS[:2])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def greedy(b):
        return [(o.token_ids, o.logprobs) for o in b.generate(b.prefill(prompts), params)]

    before = greedy(backend)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    start = time.perf_counter()
    backend.update_weights({n: p.detach() for n, p in model.named_parameters()})
    update_seconds = time.perf_counter() - start
    changed = greedy(backend)
    native = greedy(NativeBackend(model, tokenizer, block_size=16))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(original[n])
    backend.update_weights(original)
    restored = greedy(backend)
    agree = [_agree(a[0], b[0]) for a, b in zip(changed, native)]
    return {"before": [x[0] for x in before], "changed": [x[0] for x in changed], "native_changed": [x[0] for x in native],
            "restored": [x[0] for x in restored], "update_seconds": update_seconds, "changed_vs_native_agree": agree,
            "changed_vs_native_max_logprob_diff": max(abs(x - y) for a, b, k in zip(changed, native, agree)
                                                      for x, y in zip(a[1][:k], b[1][:k])),
            "max_logprob_diff_restored": max(abs(x - y) for a, b in zip(before, restored) for x, y in zip(a[1], b[1]))}


def check_misses(backend, model, tokenizer) -> dict:
    """A reset between prefill and generate makes every child miss the trunk: counted, and raised if strict."""
    from thaw_rl import SamplingParams

    prompt = chat_prompts(tokenizer, [QUESTIONS[2]])
    params = SamplingParams(temperature=0.0, max_tokens=2)
    before = backend.counters()
    handles = backend.fork(backend.prefill(prompt)[0], 2)
    backend.reset_prefix_cache()
    backend.generate(handles, params)
    after = backend.counters()
    backend.strict_prefix_cache = True
    handles = backend.fork(backend.prefill(prompt)[0], 1)
    backend.reset_prefix_cache()
    try:
        backend.generate(handles, params)
        strict_error = None
    except RuntimeError as err:
        strict_error = str(err)
    backend.strict_prefix_cache = False
    return {"misses": after["num_prefix_cache_misses"] - before["num_prefix_cache_misses"],
            "miss_tokens": after["prefix_cache_miss_tokens"] - before["prefix_cache_miss_tokens"],
            "expected_per_child": (len(prompt[0]) - 1) // BLOCK_SIZE * BLOCK_SIZE, "strict_error": strict_error}


def check_snapshot_save(backend, model, tokenizer) -> dict:
    """Snapshot a trunk (prompt + 8 sampled tokens) to the shared directory; greedy-continue it here."""
    from thaw_rl import SamplingParams

    prompt = chat_prompts(tokenizer, [f"{STORY} {QUESTIONS[1]}"])
    trunk = backend.prefill(prompt)[0]
    backend.generate([trunk], SamplingParams(temperature=1.0, max_tokens=8, seed=3))
    snap = backend.snapshot(trunk)
    out = backend.generate(backend.fork(trunk, 1), SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    return {"trunk_tokens": trunk.num_tokens, "snapshot_tokens": snap.num_tokens,
            "snapshot_computed": snap.num_computed, "snapshot_kv_shape": list(snap.kv.shape),
            "snapshot_fingerprint": snap.fingerprint, "greedy": out.token_ids, "logprobs": out.logprobs,
            "hash_seed": os.environ.get("PYTHONHASHSEED")}


def check_snapshot_restore(backend, model, tokenizer, saved: dict) -> dict:
    """In a fresh engine (another process, another hash seed): restore the snapshot file, continue 2 children."""
    from thaw_rl import SamplingParams
    from thaw_rl.snapshot import KVSnapshot

    files = sorted(backend.snapshot_dir.glob("*.thawkv"))
    snap = KVSnapshot.load(files[-1])
    handle = backend.restore(snap)  # the whole trunk: its full blocks load, its tail is computed
    before = backend.counters()
    kids = backend.fork(handle, 2)
    outs = backend.generate(kids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    after = backend.counters()
    return {"files": len(files), "greedy": [o.token_ids for o in outs], "logprobs": [o.logprobs for o in outs],
            "num_cached_tokens": [o.num_cached_tokens for o in outs], "snapshot_computed": snap.num_computed,
            "restored_tokens": len(snap.token_ids),
            "misses": after["num_prefix_cache_misses"] - before["num_prefix_cache_misses"],
            "computed_prompt_tokens": (after["decode_tokens"] - before["decode_tokens"]) - 2 * 15,
            "hash_seed": os.environ.get("PYTHONHASHSEED")}


def check_bad_model() -> dict:
    from thaw_rl.backends.vllm_backend import VLLMBackend

    out = {}
    with tempfile.TemporaryDirectory() as d:
        try:
            VLLMBackend(d)
        except ValueError as err:
            out["no_config"] = str(err)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"architectures": ["NoSuchModelForCausalLM"], "model_type": "no_such_model"}, f)
        try:
            VLLMBackend(d, enforce_eager=True, kv_cache_memory_bytes=KV_BYTES)
        except ValueError as err:
            out["unloadable"] = str(err)
    return out


def check_trainer() -> dict:
    """ThawGRPOTrainer with rollout_backend='vllm' on SmolLM2: 2 steps, then vLLM's outputs follow the new weights."""
    import torch
    from datasets import Dataset

    from thaw_rl import NativeBackend, SamplingParams
    from thaw_rl.offline_models import load_smollm2
    from thaw_rl.trainers import ThawGRPOConfig, ThawGRPOTrainer

    model, tokenizer = load_smollm2(torch.float32)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]})

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(c[0]["content"])) / 20.0 for c in completions]

    with tempfile.TemporaryDirectory() as out_dir:
        args = ThawGRPOConfig(
            output_dir=out_dir, rollout_backend="vllm", num_generations=4, per_device_train_batch_size=4,
            max_completion_length=12, max_steps=2, learning_rate=1e-4, logging_steps=1, report_to="none",
            use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", seed=0,
            kv_block_size=BLOCK_SIZE, kv_cache_memory=KV_BYTES, vllm_max_model_length=512,
            vllm_engine_kwargs={"enforce_eager": True})
        trainer = ThawGRPOTrainer(model, reward_funcs=reward_len, args=args, train_dataset=data,
                                  processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        backend = trainer.vllm_backend
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        changed = sum(not torch.equal(original[n], p.detach()) for n, p in model.named_parameters())
        prompt = chat_prompts(tokenizer, QUESTIONS[:2])
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        t = time.perf_counter()
        backend.update_weights({n: p.detach() for n, p in model.named_parameters()})
        update_seconds = time.perf_counter() - t
        trained = backend.generate(backend.prefill(prompt), params)
        nat = NativeBackend(model, tokenizer, block_size=16)
        native = nat.generate(nat.prefill(prompt), params)
        backend.update_weights(original)
        initial = backend.generate(backend.prefill(prompt), params)
        stats = trainer.last_rollout.stats
        metrics = sorted(k for h in trainer.state.log_history for k in h if k.startswith("thaw/"))
    return {
        "steps": trainer.state.global_step, "losses": losses, "train_seconds": train_seconds,
        "num_params": len(original), "num_changed": changed, "last_synced_step": trainer._vllm_synced_step,
        "trained_tokens": [a.token_ids for a in trained], "native_tokens": [b.token_ids for b in native],
        "trained_vs_native_agree": [_agree(a.token_ids, b.token_ids) for a, b in zip(trained, native)],
        "trained_vs_native_max_logprob_diff": max(abs(x - y) for a, b in zip(trained, native)
                                                  for x, y in list(zip(a.logprobs, b.logprobs))[:_agree(a.token_ids, b.token_ids)]),
        "update_seconds": update_seconds, "post_train_seconds": time.perf_counter() - start - train_seconds,
        "trained_vs_initial_max_logprob_diff": max(abs(x - y) for a, b in zip(trained, initial)
                                                   for x, y in zip(a.logprobs, b.logprobs)),
        "last_rollout_misses": backend.counters()["num_prefix_cache_misses"],
        "last_rollout_reused": stats.reused_tokens, "thaw_metrics": metrics[:5],
    }


def _agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checks")
    parser.add_argument("--out", required=True)
    parser.add_argument("--snapshot-dir", default=None, help="engine with ThawKVConnector over this directory")
    parser.add_argument("--saved", default=None, help="result JSON of the snapshot_save run (for snapshot_restore)")
    args = parser.parse_args()
    checks = args.checks.split(",")
    result = {}
    if "bad_model" in checks:
        result["bad_model"] = check_bad_model()
    if "trainer" in checks:
        result["trainer"] = check_trainer()
    engine_checks = [c for c in checks if c in ("greedy", "sampler", "weights", "misses", "snapshot_save",
                                                 "snapshot_restore")]
    if engine_checks:
        import torch

        from thaw_rl.offline_models import load_smollm2

        backend, start_seconds = build_backend(snapshot_dir=args.snapshot_dir)
        result["engine_start_seconds"] = start_seconds
        print(f"engine start: {start_seconds:.1f} s", file=sys.stderr, flush=True)
        model, tokenizer = load_smollm2(torch.float32)
        for name in engine_checks:
            start = time.perf_counter()
            extra = [json.loads(Path(args.saved).read_text())["snapshot_save"]] if name == "snapshot_restore" else []
            result[name] = globals()[f"check_{name}"](backend, model, tokenizer, *extra)
            result[name]["seconds"] = time.perf_counter() - start
            print(f"check {name}: {result[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
