"""The training scoring pass alone: TRL's flat rows vs shared-prefix packing (dense SDPA mask, FlexAttention).

One micro-batch of one GRPO group (``--group`` rows sharing a ``--prompt-len`` prompt, completions of
``--completion-len`` tokens, lengths drawn so about a quarter stop early), or a segment tree
(``--tree 4,2,2 --segment 64``: rows share the prompt and their ancestors' segments). For each path we
time, on the model TRL trains (fused LM head, gradient checkpointing, bf16):

- ``fwd+bwd``: the loss forward and backward of ``_get_per_token_logps_and_entropies`` (with entropy);
- ``no-grad``: the old-policy / reference logprob pass;

and report the packed/flat token counts and the bf16 logprob differences packed - flat over the valid
completion tokens (median, p99, max), which is rounding of a different reduction order, nothing else
(fp32 agreement is a CPU test). The flat row's own difference is the bf16 floor: the same rows scored
flat again in another batch order and size. Table last; ``--out`` writes a receipt.

    python benchmarks/packed_training.py --out benchmarks/results/packed_training_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from receipt_utils import receipt, write_receipt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-1.5b")
    p.add_argument("--shapes", default="16x512+256,16x2048+512,tree:4.2.2x64:512+256",
                   help="comma list of GxP+C (a GRPO group) or tree:B1.B2.B3xS:P+C (a segment tree)")
    p.add_argument("--groups", type=int, default=1, help="groups (trees) per micro-batch")
    p.add_argument("--paths", default="flat,dense,flex",
                   help="flat, dense, flex, or flex@VARIANT: flex compiled another way (FLEX_VARIANTS)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--profile", type=Path, default=None,
                   help="directory: a torch.profiler table of one more fwd+bwd per shape and path")
    return p.parse_args()


def make_rows(shape: str, groups: int, vocab: int, gen: torch.Generator):
    """(prompts, completions) token lists for ``groups`` groups or trees of the shape."""
    prompts, completions = [], []
    if shape.startswith("tree:"):
        branching_seg, lens = shape[5:].split(":")
        branching, segment = branching_seg.split("x")
        branching = [int(b) for b in branching.split(".")]
        prompt_len, completion_len = (int(x) for x in lens.split("+"))
        for _ in range(groups):
            prompt = torch.randint(2, vocab, (prompt_len,), generator=gen).tolist()
            paths = [[]]
            for level, b in enumerate(branching):
                last = level == len(branching) - 1
                n = completion_len - int(segment) * level if last else int(segment)
                paths = [p + torch.randint(2, vocab, (n,), generator=gen).tolist() for p in paths for _ in range(b)]
            prompts += [prompt] * len(paths)
            completions += paths
        return prompts, completions, completion_len
    g, lens = shape.split("x")
    prompt_len, completion_len = (int(x) for x in lens.split("+"))
    for _ in range(groups):
        prompt = torch.randint(2, vocab, (prompt_len,), generator=gen).tolist()
        for _ in range(int(g)):
            early = torch.rand((), generator=gen).item() < 0.25
            n = int(torch.randint(completion_len // 4, completion_len, (), generator=gen)) if early else completion_len
            prompts.append(prompt)
            completions.append(torch.randint(2, vocab, (n,), generator=gen).tolist())
    return prompts, completions, completion_len


def timed(fn, repeats):
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        if i:  # the first call compiles / warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


FLEX_VARIANTS = {  # how tree_attention's flex call is compiled, to measure alternatives to its default
    "autotune": dict(mode="max-autotune-no-cudagraphs"),
    "safe": dict(kernel_options={"ROWS_GUARANTEED_SAFE": True}),  # every token sees itself: no empty rows
    "autotune_safe": dict(mode="max-autotune-no-cudagraphs", kernel_options={"ROWS_GUARANTEED_SAFE": True}),
}


def use_flex_variant(variant: str) -> None:
    """Point tree_attention's compiled flex at ``FLEX_VARIANTS[variant]`` ('' = the library's default)."""
    import functools

    from torch.nn.attention.flex_attention import flex_attention

    from thaw_rl.trainers import tree_attention

    if not variant:
        tree_attention._flex = None
        return
    options = dict(FLEX_VARIANTS[variant])
    fn = torch.compile(flex_attention, mode=options.pop("mode", None))
    tree_attention._flex = functools.partial(fn, **options) if options else fn


def main():
    args = parse_args()
    from engine_throughput import load_model
    from trl.trainer.utils import add_fused_lm_head

    from thaw_rl.testing import trl_flat_logps, trl_rows
    from thaw_rl.trainers.shared_prefix import packed_logps
    from thaw_rl.trainers.tree_attention import tree_attention_mode

    model, _ = load_model(args.model, torch.bfloat16, "cuda")
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    model.train()
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        prompts, completions, width = make_rows(shape, args.groups, model.config.vocab_size, gen)
        ids, mask = trl_rows(prompts, completions, width, pad=1, device="cuda")
        valid = mask[:, -width:].bool()
        result = {"shape": shape, "rows": len(prompts), "flat_tokens": ids.numel()}
        logps = {}
        for path in args.paths.split(","):
            kind, _, variant = path.partition("@")
            if kind == "flex":
                use_flex_variant(variant)

            def score(grad: bool, entropy: bool = True):
                mode = tree_attention_mode(model) if path != "flat" else contextlib.nullcontext()
                with mode:  # held through backward: checkpointed layers recompute with the tree mask
                    with torch.set_grad_enabled(grad), torch.autocast("cuda", torch.bfloat16):
                        if path == "flat":
                            lp, ent = trl_flat_logps(model, ids, mask, width)
                        else:
                            s = packed_logps(model, model, ids, mask, width, max_rows=None, max_tokens=None,
                                             mask_kind=kind, compute_entropy=entropy)
                            result["packed_tokens"] = s.batch.num_tokens
                            lp, ent = s.logps, s.entropies
                    if not grad:
                        return lp
                    loss = (lp * valid).sum() / valid.sum() + (ent * valid).sum() * 1e-3
                    loss.backward()
                model.zero_grad(set_to_none=True)
                return lp.detach()

            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            score(True)  # compile / autotune outside the timing
            result.setdefault("first_call_seconds", {})[path] = time.perf_counter() - t0
            t_train, lp = timed(lambda: score(True), args.repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30
            t_nograd, _ = timed(lambda: score(False, entropy=False), args.repeats)
            if args.profile:
                from grpo_step import profiler_activities, write_profile

                with torch.profiler.profile(activities=profiler_activities()) as prof:
                    score(True)
                    torch.cuda.synchronize()
                write_profile(prof, args.profile / f"profile_{shape.replace(':', '_')}_{path}.txt")
            logps[path] = lp.float()
            result[path] = {"fwd_bwd_ms": t_train * 1e3, "no_grad_ms": t_nograd * 1e3, "peak_gib": peak}
        if "flat" in logps:  # the bf16 floor: the same flat rows scored in reverse order, in two halves
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                rev = torch.arange(len(prompts) - 1, -1, -1, device="cuda")
                half = len(prompts) // 2
                parts = [trl_flat_logps(model, ids[rev[i:i + half]], mask[rev[i:i + half]], width)[0]
                         for i in (0, half)]
            again = torch.cat(parts)[rev.argsort()].float()
            d = (again - logps["flat"])[valid].abs()
            result["flat"]["logp_diff_vs_flat"] = {
                "median": d.median().item(), "p99": d.quantile(0.99).item(), "max": d.max().item()}
        for path in logps:
            if path != "flat" and "flat" in logps:
                d = (logps[path] - logps["flat"])[valid].abs()
                result[path]["logp_diff_vs_flat"] = {
                    "median": d.median().item(), "p99": d.quantile(0.99).item(), "max": d.max().item()}
        rows.append(result)
        print(result, flush=True)
    write_receipt(args.out, receipt("packed_training", args, rows))
    print(f"{'shape':>22} {'path':>6} {'tokens':>8} {'fwd+bwd ms':>11} {'no-grad ms':>11} {'peak GiB':>9} "
          f"{'speedup':>8} {'|dlogp| p50/p99/max':>24}")
    for r in rows:
        base = r.get("flat", {}).get("fwd_bwd_ms")
        for path in args.paths.split(","):
            x = r[path]
            tokens = r["flat_tokens"] if path == "flat" else r["packed_tokens"]
            d = x.get("logp_diff_vs_flat")
            diff = f"{d['median']:.4f}/{d['p99']:.4f}/{d['max']:.4f}" if d else "-"
            speed = f"{base / x['fwd_bwd_ms']:.2f}x" if base else "-"
            print(f"{r['shape']:>22} {path:>6} {tokens:>8,} {x['fwd_bwd_ms']:>11.1f} {x['no_grad_ms']:>11.1f} "
                  f"{x['peak_gib']:>9.1f} {speed:>8} {diff:>24}")


if __name__ == "__main__":
    main()
