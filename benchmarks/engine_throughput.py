"""GRPO-shaped rollout throughput: ThawEngine vs model.generate(num_return_sequences=G).

model.generate is the path TRL's GRPOTrainer takes without vLLM: it expands every prompt G times and
prefills each copy. The engine prefills each prompt once, forks it G times and decodes all P*G children
in one continuously batched loop (CUDA graphs + Triton paged attention on GPU).

    python benchmarks/engine_throughput.py --model smollm2 --prompts 4 --group 8 --prompt-len 128 --completion-len 64
    python benchmarks/engine_throughput.py --model qwen2.5-1.5b --dtype bfloat16 --prompts 8 --group 16 \
        --prompt-len 512 --completion-len 256 --decode-batches 1,16,128 --out benchmarks/results/engine_h100.json

Both sides generate exactly completion-len tokens per sample (min_new_tokens / ignore_eos), same model
object, same run. Prints a short table last and writes a JSON receipt with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from receipt_utils import git_commit  # noqa: E402
from thaw_rl import SamplingParams, ThawEngine  # noqa: E402

CONFIGS = {  # real shapes, random weights (no hub on the benchmark machines)
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=5e5, tie_word_embeddings=False),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(name: str, dtype: torch.dtype, device: str):
    """(model, tokenizer or None): ``smollm2`` (offline), a random model of a ``CONFIGS`` shape, or ``tiny-<family>``
    (thaw_rl.testing's tiny llama/qwen2/qwen3 with its tokenizer: seconds-long CPU checks of a benchmark)."""
    if name.startswith("tiny-"):
        from thaw_rl.testing import tiny_model_and_tokenizer

        model, tok = tiny_model_and_tokenizer(name[len("tiny-"):], dtype=dtype)
        return model.to(device), tok
    if name == "smollm2":
        from thaw_rl.offline_models import load_smollm2

        model, tok = load_smollm2(dtype=dtype, device=device)
        return model, tok
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIGS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.eos_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), None


def engine_rollout(engine, prompts, group, completion_len, seed=0):
    device = engine.device
    engine.reset_prefix_cache()  # an RL step has new weights: nothing cached from the previous step is valid
    before = engine.stats
    sync(device)
    t0 = time.perf_counter()
    trunks = engine.prefill_many(prompts)
    kids = [k for t in trunks for k in engine.fork(t, group)]
    outs = engine.generate(kids, SamplingParams(temperature=1.0, max_tokens=completion_len, ignore_eos=True, seed=seed))
    sync(device)
    dt = time.perf_counter() - t0
    after = engine.stats
    for s in kids + trunks:
        engine.free(s)
    return dict(seconds=dt, completion_tokens=sum(len(o.token_ids) for o in outs),
                prompt_tokens_prefilled=after.prompt_tokens_computed - before.prompt_tokens_computed,
                fork_ms=(after.fork_seconds - before.fork_seconds) * 1e3)


def hf_rollout(model, prompts, group, completion_len):
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=completion_len, min_new_tokens=completion_len,
                             num_return_sequences=group, pad_token_id=0)
    sync(device)
    dt = time.perf_counter() - t0
    return dict(seconds=dt, completion_tokens=int(out[:, ids.shape[1]:].numel()),
                prompt_tokens_prefilled=int(ids.numel()) * group)


def decode_rate_engine(engine, batch, prompt_len, new_tokens, vocab):
    """Completion tokens/s of pure decode at a fixed batch (prefill excluded)."""
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(10, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    warm = engine.prefill_many(prompts)  # capture this batch size's graph outside the timed region
    engine.generate(warm, SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=2))
    for s in warm:
        engine.free(s)
    engine.reset_prefix_cache()
    sessions = engine.prefill_many(prompts)
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=1)
    sync(engine.device)
    t0 = time.perf_counter()
    engine.generate(sessions, params)
    sync(engine.device)
    dt = time.perf_counter() - t0
    for s in sessions:
        engine.free(s)
    return batch * new_tokens / dt


def decode_rate_hf(model, batch, prompt_len, new_tokens, vocab):
    """(t(N new) - t(1 new)) isolates decode from prefill for model.generate."""
    device = next(model.parameters()).device
    ids = torch.randint(10, vocab, (batch, prompt_len), device=device)

    def run(n):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    t1, tn = run(1), run(new_tokens)
    return batch * (new_tokens - 1) / max(tn - t1, 1e-9)


def check_against_forward(engine, model, vocab, device):
    """Greedy engine logprobs vs a plain forward of the same sequence (max abs difference)."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(10, vocab, (70,), generator=g).tolist()
    (o,) = engine.generate([engine.prefill(prompt)], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    seq = torch.tensor([prompt + o.token_ids], device=device)
    with torch.inference_mode():
        logits = model(seq).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, seq[0, len(prompt):, None])[:, 0]
    argmax_ok = (logits[len(prompt) - 1:-1].argmax(-1) == seq[0, len(prompt):]).float().mean().item()
    engine.free(o.session)
    return dict(max_abs_logprob_diff=(lp.cpu() - torch.tensor(o.logprobs)).abs().max().item(),
                greedy_token_agreement=argmax_ok)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", *CONFIGS])
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--decode-batches", default="", help="e.g. 1,16,128: also measure pure decode tokens/s")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--kv-cache-memory", type=float, default=None, help="bytes, or a fraction of free GPU memory")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--compile-layers", action="store_true", help="regional torch.compile of decoder layers")
    ap.add_argument("--cascade", choices=("auto", "on", "off"), default="auto",
                    help="the engine's cascade (shared-prefix) decode attention (auto: its default)")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                    help="auto: the model's dtype; fp8: float8_e4m3fn KV cache (half the bytes; rounds K/V)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tok = load_model(args.model, dtype, str(device))
    vocab = model.config.vocab_size
    kv_mem = args.kv_cache_memory
    if kv_mem is None:
        kv_mem = 0.5 if device.type == "cuda" else float(1 << 30)
    kv_mem = kv_mem if kv_mem < 1 else int(kv_mem)
    engine = ThawEngine(model, tok, kv_cache_memory=kv_mem, use_cuda_graphs=not args.no_cuda_graphs and None,
                        max_num_seqs=max(256, args.prompts * args.group), compile_layers=args.compile_layers,
                        cascade_attention=args.cascade, kv_cache_dtype=args.kv_cache_dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]

    print(f"device={device} model={args.model} dtype={dtype} P={args.prompts} G={args.group} "
          f"prompt={args.prompt_len} completion={args.completion_len}", flush=True)
    correctness = check_against_forward(engine, model, vocab, device)
    print("correctness", correctness, flush=True)
    # The first call of a shape pays one-time costs (CUDA-graph capture per batch size, torch.compile,
    # Triton autotuning); an RL run pays them at its first step. Both paths run the workload twice and
    # the second (steady-state) run is compared; the first is recorded too.
    thaw_first = engine_rollout(engine, prompts, args.group, args.completion_len, seed=1)
    thaw = engine_rollout(engine, prompts, args.group, args.completion_len)
    thaw["first_call_seconds"] = thaw_first["seconds"]
    print("thaw", thaw, flush=True)
    base = None
    if not args.skip_baseline:
        base_first = hf_rollout(model, prompts, args.group, args.completion_len)
        base = hf_rollout(model, prompts, args.group, args.completion_len)
        base["first_call_seconds"] = base_first["seconds"]
        print("model.generate", base, flush=True)

    decode = {}
    for b in [int(x) for x in args.decode_batches.split(",") if x]:
        row = {"thaw_tok_s": decode_rate_engine(engine, b, args.prompt_len, args.decode_tokens, vocab)}
        if not args.skip_baseline:
            row["generate_tok_s"] = decode_rate_hf(model, b, args.prompt_len, args.decode_tokens, vocab)
            row["ratio"] = row["thaw_tok_s"] / row["generate_tok_s"]
        decode[b] = row
        print("decode batch", b, row, flush=True)

    import transformers

    receipt = dict(
        benchmark="engine_throughput", command=" ".join(sys.argv), commit=git_commit(),
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
        model=args.model, dtype=str(dtype), prompts=args.prompts, group=args.group, prompt_len=args.prompt_len,
        completion_len=args.completion_len, compile_layers=args.compile_layers, cascade=args.cascade,
        kv_cache_dtype=args.kv_cache_dtype,
        cascade_steps=engine.stats.num_cascade_steps, preemptions=engine.stats.num_preemptions,
        kv_pool_blocks=engine.stats.num_blocks, correctness=correctness, thaw=thaw, generate=base,
        decode=decode,
    )
    if base:
        receipt["speedup_tokens_per_s"] = (thaw["completion_tokens"] / thaw["seconds"]) / (
            base["completion_tokens"] / base["seconds"])
        receipt["speedup_first_call"] = base["first_call_seconds"] / thaw["first_call_seconds"]
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(receipt, f, indent=2)

    print("\n| path | seconds | completion tok/s | prompt tokens prefilled |")
    print("|---|---:|---:|---:|")
    for name, r in (("thaw engine", thaw), ("model.generate", base)):
        if r:
            print(f"| {name} | {r['seconds']:.2f} (first call {r['first_call_seconds']:.2f}) | "
                  f"{r['completion_tokens'] / r['seconds']:.1f} | {r['prompt_tokens_prefilled']:,} |")
    if base:
        print(f"speedup (tokens/s, steady state): {receipt['speedup_tokens_per_s']:.2f}x; "
              f"first call: {receipt['speedup_first_call']:.2f}x")
    print(f"KV pool {engine.stats.num_blocks} blocks ({engine.spec.dtype}), preemptions {engine.stats.num_preemptions}")
    for b, row in decode.items():
        print(f"decode batch {b}: " + ", ".join(f"{k}={v:.1f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
