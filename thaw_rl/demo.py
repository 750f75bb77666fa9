"""Engine demo: GRPO-shaped rollouts on SmolLM2-135M-Instruct, the engine on its own (no training).

Prefills each prompt once, forks it into G children copy-on-write, samples them together, and prints
what was computed against what a flat sampler (``model.generate(num_return_sequences=G)``, TRL's path
without vLLM) would have computed. ``--compare`` also runs and times that flat path in the same run.
The README's main command is the training quickstart (``thaw-rl train recipes/quickstart_cpu.yaml``).

    python -m thaw_rl.demo [--prompts 4] [--group 8] [--max-tokens 64] [--compare]

Completion tokens are counted up to and including each sample's first stop token: SmolLM2's pad id
equals its eos id, so the padding ``generate`` adds after a finished row is not counted as tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from thaw_rl import SamplingParams, ThawEngine
from thaw_rl.offline_models import load_smollm2

QUESTIONS = [
    "What is 17 + 25? Answer with the number.",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give me a word that rhymes with cat.",
    "How many legs does a spider have?",
    "What is 9 times 7?",
    "Say hello in Spanish.",
]


def completion_lengths(new_tokens: torch.Tensor, stop_ids: set[int]) -> list[int]:
    """Tokens per row of ``generate``'s new tokens ``(R, T)``, up to and including the first stop token.

    ``generate`` pads a finished row with ``pad_token_id``; when that equals the eos id (SmolLM2), a
    ``!= pad`` test cannot tell the padding from the stop, so count up to the first stop instead.
    """
    is_stop = torch.isin(new_tokens, torch.tensor(sorted(stop_ids), dtype=new_tokens.dtype))  # (R, T)
    first = torch.where(is_stop.any(-1), is_stop.int().argmax(-1) + 1, new_tokens.shape[-1])  # (R,)
    return first.tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO's num_generations)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="also time model.generate(num_return_sequences=G)")
    args = ap.parse_args(argv)
    console = Console()

    console.print("[bold]thaw-rl engine demo[/bold]: loading SmolLM2-135M-Instruct (offline)...")
    model, tok = load_smollm2()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                add_generation_prompt=True, tokenize=True)
        for i in range(args.prompts)
    ]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    engine = ThawEngine(model, tok, kv_cache_memory=256 << 20)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)

    start = time.perf_counter()
    trunks = engine.prefill_many(prompts)
    children = [kid for t in trunks for kid in engine.fork(t, args.group)]
    outs = engine.generate(children, params, progress=True)
    elapsed = time.perf_counter() - start
    st = engine.stats
    completion_tokens = sum(len(o.token_ids) for o in outs)
    flat_prefill = sum(len(p) for p in prompts) * args.group

    table = Table(title=f"{args.prompts} prompts x {args.group} samples, up to {args.max_tokens} new tokens")
    table.add_column("")
    table.add_column("thaw engine", justify="right")
    table.add_column("flat sampler", justify="right")
    flat = {"time": "", "tokens": "-", "rate": ""}
    if args.compare:
        flat = run_flat(model, tok, prompts, args, engine.eos_token_ids)
    table.add_row("prompt tokens prefilled", f"{st.prompt_tokens_computed:,}", f"{flat_prefill:,}")
    table.add_row("completion tokens", f"{completion_tokens:,}", flat["tokens"])
    table.add_row("forks (children)", f"{st.num_forks} ({len(children)})", "-")
    table.add_row("fork time", f"{st.fork_seconds * 1e3:.2f} ms", "-")
    shared_mib = (flat_prefill - st.prompt_tokens_computed) * engine.spec.bytes_per_token / 2**20
    table.add_row("KV shared by forks", f"{shared_mib:.1f} MiB", "-")
    table.add_row("rollout time", f"{elapsed:.1f} s", flat["time"])
    table.add_row("completion tokens/s", f"{completion_tokens / elapsed:.1f}", flat["rate"])
    console.print(table)
    if not args.compare:
        console.print("[dim]--compare also runs model.generate(num_return_sequences=G) for the flat column's times.[/dim]")
    sample = tok.decode(outs[0].token_ids, skip_special_tokens=True).strip().replace("\n", " ")
    console.print(f"[dim]a sample for {QUESTIONS[0]!r} (SmolLM2-135M is tiny and samples at temperature "
                  f"{args.temperature}: expect odd answers; the demo measures the engine, not the model):[/dim] "
                  f"{sample[:120]}")
    saved = 1 - st.prompt_tokens_computed / flat_prefill
    console.print(f"[green]prefill saved: {saved:.0%}[/green] of prompt tokens "
                  f"({flat_prefill - st.prompt_tokens_computed:,} of {flat_prefill:,}).")


def run_flat(model, tok, prompts: list[list[int]], args, stop_ids: set[int]) -> dict[str, str]:
    """``model.generate(num_return_sequences=G)`` on the same prompts: its time, completion tokens and rate."""
    torch.manual_seed(args.seed)
    pad = tok.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (P, W) left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (P, W)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                             top_k=0, max_new_tokens=args.max_tokens, num_return_sequences=args.group)
    seconds = time.perf_counter() - t0
    tokens = sum(completion_lengths(ref[:, width:], stop_ids))  # ref: (P * G, W + T)
    return {"time": f"{seconds:.1f} s", "tokens": f"{tokens:,}", "rate": f"{tokens / seconds:.1f}"}


if __name__ == "__main__":
    main()
