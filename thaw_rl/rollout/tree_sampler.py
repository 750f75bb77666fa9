"""``TreeSampler``: sample a rollout tree per prompt on any ``RolloutBackend``, batched across prompts.

All prompts are prefilled in one ``prefill`` call, and every level (segments) or round (entropy) of
every prompt's tree is one ``generate`` call, so the backend packs all prompts' branches into the same
forward steps. Forks are ``backend.fork`` calls: the children share the parent's KV, so a shared
prefix (the prompt, a trunk segment) is computed once however many leaves sit below it.

Each branch carries the tokens, logprobs and entropies of its whole path; a child starts with a copy of
its parent's lists up to the fork, so the tokens and logprobs of a shared segment are the same
numbers in every leaf below it (they were sampled once).

Seeds: with ``params.seed`` set, each tree node samples with ``derive_seed(params.seed, node_id)``
(node ids are given out in a fixed order), so siblings differ and a rerun reproduces the batch; the
backend uses each node's seed as given. Every
backend handle is freed before ``rollout`` returns, also when it raises.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Sequence

from thaw_rl.backends.base import RolloutBackend
from thaw_rl.engine.sampling import SamplingParams, derive_seed
from thaw_rl.rollout.rollout_batch import Leaf, Node, RolloutBatch, RolloutStats
from thaw_rl.rollout.tree_spec import TreeSpec

_TOKEN_COUNTERS = ("prefill_tokens", "decode_tokens", "reused_tokens", "sampled_tokens", "num_forks", "cascade_steps")
_TIME_COUNTERS = ("fork_seconds", "snapshot_seconds", "restore_seconds")


@dataclass
class _Path:
    """One backend sequence: a branch being decoded, or a finished leaf."""

    handle: Any
    prompt_index: int
    node_id: int  # the tree node its newest tokens belong to (always a leaf of the tree)
    seed: int | None
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str | None = None  # None while it may still decode
    round_start: int = 0  # completion offset where its last generate call began

    def extend(self, completion) -> None:
        self.round_start = len(self.token_ids)
        self.token_ids += completion.token_ids
        self.logprobs += completion.logprobs
        self.entropies += completion.entropies

    def child(self, handle: Any, node_id: int, seed: int | None, at: int) -> "_Path":
        """A branch forked from this one keeping its first ``at`` completion tokens."""
        return _Path(handle, self.prompt_index, node_id, seed, self.token_ids[:at], self.logprobs[:at],
                     self.entropies[:at])


class _Tree:
    """Nodes with completion-offset spans; ids are given out in creation order."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}

    def add(self, parent_id: int | None, prompt_index: int, start: int) -> Node:
        node = Node(len(self.nodes), parent_id, prompt_index, start, start)
        self.nodes[node.node_id] = node
        if parent_id is not None:
            self.nodes[parent_id].children.append(node.node_id)
        return node

    def containing(self, node_id: int, offset: int) -> Node:
        """The node on the path root -> node_id whose span holds completion offset ``offset``."""
        node = self.nodes[node_id]
        while not node.start <= offset < node.end:
            if node.parent_id is None:
                raise RuntimeError(f"offset {offset} is not on the path to node {node_id}")
            node = self.nodes[node.parent_id]
        return node

    def split(self, node: Node, offset: int) -> Node:
        """Cut ``node`` at ``offset``: it keeps ``[start, offset)``, a new child takes the rest and its children."""
        assert node.start < offset < node.end, (node, offset)
        rest = Node(len(self.nodes), node.node_id, node.prompt_index, offset, node.end, node.children)
        self.nodes[rest.node_id] = rest
        for child in rest.children:
            self.nodes[child].parent_id = rest.node_id
        node.end, node.children = offset, [rest.node_id]
        return rest

    def path(self, node_id: int) -> list[int]:
        ids = []
        while node_id is not None:
            ids.append(node_id)
            node_id = self.nodes[node_id].parent_id
        return ids[::-1]

    def leaves_in_order(self, root_id: int) -> list[int]:
        """Leaf node ids below ``root_id``, depth first, children in creation order."""
        out, stack = [], [root_id]
        while stack:
            node = self.nodes[stack.pop()]
            if not node.children:
                out.append(node.node_id)
            stack.extend(reversed(node.children))
        return out


class TreeSampler:
    """Samples ``spec``-shaped trees on ``backend``; ``rollout(prompts, params)`` returns a ``RolloutBatch``."""

    def __init__(self, backend: RolloutBackend, spec: TreeSpec | None = None) -> None:
        self.backend = _as_backend(backend)
        self.spec = spec if spec is not None else TreeSpec.grpo(1)

    def rollout(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Sample one tree per prompt. ``params.max_tokens`` bounds every completion (root to leaf)."""
        prompts = [[int(t) for t in p] for p in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("rollout() got an empty prompt: give at least one token id per prompt.")
        self.spec.check_params(params)
        before = self.backend.counters()
        start = time.perf_counter()
        run = _Run(self.backend, self.spec, prompts, params)
        try:
            if prompts:
                run.entropy() if self.spec.kind == "entropy" else run.segments()
        finally:
            run.free_all()
        wall = time.perf_counter() - start
        return run.batch(_delta(before, self.backend.counters()), wall)


def _as_backend(backend: Any) -> RolloutBackend:
    """A ``RolloutBackend`` as given; a bare ``ThawEngine`` (the README's first object) wrapped in ``NativeBackend``."""
    from thaw_rl.engine.engine import ThawEngine

    if isinstance(backend, ThawEngine):
        from thaw_rl.backends.native import NativeBackend

        return NativeBackend(engine=backend)
    missing = [name for name in ("prefill", "fork", "generate", "free", "counters") if not hasattr(backend, name)]
    if missing:
        raise TypeError(f"TreeSampler needs a rollout backend (NativeBackend(engine=...), VLLMBackend, ForkPool) or a "
                        f"ThawEngine; got {type(backend).__name__}, which has no {', '.join(missing)}.")
    return backend


class _Run:
    """The state of one ``rollout`` call."""

    def __init__(self, backend: RolloutBackend, spec: TreeSpec, prompts: list[list[int]],
                 params: SamplingParams) -> None:
        self.backend, self.spec, self.prompts, self.params = backend, spec, prompts, params
        self.tree = _Tree()
        self.roots = [self.tree.add(None, i, 0).node_id for i in range(len(prompts))]
        self.leaves: list[_Path] = []  # finished paths
        self._held: dict[int, Any] = {}  # id(handle) -> handle not yet freed

    # -- backend calls that keep track of handles ------------------------------------------------------
    def _prefill(self) -> list[Any]:
        handles = self.backend.prefill(self.prompts)
        self._held.update((id(h), h) for h in handles)
        return handles

    def _fork(self, handle: Any, n: int, at: int | None = None) -> list[Any]:
        kids = self.backend.fork(handle, n, at=at)
        self._held.update((id(h), h) for h in kids)
        return kids

    def _free(self, handle: Any) -> None:
        self.backend.free(self._held.pop(id(handle)))

    def free_all(self) -> None:
        for handle in list(self._held.values()):
            self._free(handle)

    def _seed(self, node_id: int) -> int | None:
        return None if self.params.seed is None else derive_seed(self.params.seed, node_id)

    def _generate(self, paths: list[_Path], max_tokens: list[int]) -> None:
        if not paths:
            return
        plist = [dataclasses.replace(self.params, max_tokens=m, seed=p.seed) for p, m in zip(paths, max_tokens)]
        outs = self.backend.generate([p.handle for p in paths], plist)
        for p, out in zip(paths, outs):
            p.extend(out)
            self.tree.nodes[p.node_id].end = len(p.token_ids)
            if out.finish_reason == "stop":
                p.finish_reason = "stop"
            elif len(p.token_ids) >= self.params.max_tokens:
                p.finish_reason = "length"

    def _branch(self, parent: _Path, n: int, parent_node: int, offset: int) -> list[_Path]:
        """n children of ``parent`` that keep its first ``offset`` completion tokens, under ``parent_node``."""
        at = None if offset == len(parent.token_ids) else len(self.prompts[parent.prompt_index]) + offset
        kids = []
        for handle in self._fork(parent.handle, n, at=at):
            node = self.tree.add(parent_node, parent.prompt_index, offset)
            kids.append(parent.child(handle, node.node_id, self._seed(node.node_id), offset))
        return kids

    # -- segments, grpo, best_of_n ---------------------------------------------------------------------
    def segments(self) -> None:
        spec, branching = self.spec, self.spec.branching
        lengths = spec.segment_lengths(self.params.max_tokens)
        live: list[_Path] = []
        for i, handle in enumerate(self._prefill()):
            root = _Path(handle, i, self.roots[i], None, [], [], [])
            live += self._branch(root, branching[0], root.node_id, 0)
            self._free(handle)
        for level, length in enumerate(lengths):
            self._generate(live, [length] * len(live))
            if level == len(lengths) - 1:
                self._finish(live)
                break
            stopped = [p for p in live if p.finish_reason is not None]
            self._finish(stopped)
            live = [p for p in live if p.finish_reason is None]
            extra = self._fill(live) if spec.fill and level == len(lengths) - 2 else [0] * len(live)
            next_live = []
            for p, more in zip(live, extra):
                next_live += self._branch(p, branching[level + 1] + more, p.node_id, len(p.token_ids))
                self._free(p.handle)
            live = next_live

    def _fill(self, parents: list[_Path]) -> list[int]:
        """Extra last-level children per parent so each prompt gets back the leaves early stops took."""
        last = self.spec.branching[-1]
        extra = [0] * len(parents)
        for i in range(len(self.prompts)):
            mine = [j for j, p in enumerate(parents) if p.prompt_index == i]
            if not mine:
                continue  # every branch of this prompt stopped: nothing left to fork
            done = sum(1 for leaf in self.leaves if leaf.prompt_index == i)
            deficit = self.spec.leaves_per_prompt - done - last * len(mine)
            for r, j in enumerate(mine):
                extra[j] = deficit // len(mine) + (r < deficit % len(mine))
        return extra

    def _finish(self, paths: list[_Path]) -> None:
        for p in paths:
            p.finish_reason = p.finish_reason or "length"
            self.leaves.append(p)
            self._free(p.handle)

    # -- entropy-triggered branching -------------------------------------------------------------------
    def entropy(self) -> None:
        spec, max_tokens = self.spec, self.params.max_tokens
        step = spec.segment_tokens or max_tokens
        paths: list[list[_Path]] = [[] for _ in self.prompts]  # every path of each prompt, in creation order
        for i, handle in enumerate(self._prefill()):
            root = _Path(handle, i, self.roots[i], None, [], [], [])
            paths[i] += self._branch(root, spec.initial, root.node_id, 0)
            self._free(handle)
        live = [p for group in paths for p in group]
        while live:
            self._generate(live, [min(step, max_tokens - len(p.token_ids)) for p in live])
            for i, group in enumerate(paths):
                group += self._fork_high_entropy(group, [p for p in live if p.prompt_index == i])
            ended = [p for p in live if p.finish_reason is not None]
            self._finish(ended)
            live = [p for group in paths for p in group if p.finish_reason is None]

    def _fork_high_entropy(self, group: list[_Path], decoded: list[_Path]) -> list[_Path]:
        """Fork the prompt's paths at this round's tokens above the threshold, highest entropy first."""
        spec = self.spec
        candidates = [(-p.entropies[q], k, q) for k, p in enumerate(decoded)
                      for q in range(p.round_start, len(p.token_ids)) if p.entropies[q] > spec.threshold]
        new: list[_Path] = []
        for _, k, q in sorted(candidates):
            budget = spec.max_leaves - len(group) - len(new)
            if budget <= 0:
                break
            p = decoded[k]
            node = self.tree.containing(p.node_id, q)
            if node.start == q:
                continue  # the token already starts a node: forking here again would fork a place twice
            rest = self.tree.split(node, q)
            if p.node_id == node.node_id:
                p.node_id = rest.node_id
            new += self._branch(p, min(spec.branch, budget), node.node_id, q)
        return new

    # -- result ----------------------------------------------------------------------------------------
    def batch(self, counters: dict[str, float], wall: float) -> RolloutBatch:
        by_node = {p.node_id: p for p in self.leaves}
        leaves = []
        for root in self.roots:
            for node_id in self.tree.leaves_in_order(root):
                if node_id not in by_node:
                    raise RuntimeError(f"tree leaf {node_id} has no finished path (sampler bug)")
                leaves.append(self._leaf(by_node.pop(node_id)))
        if by_node:
            raise RuntimeError(f"paths {sorted(by_node)} are not leaves of the tree (sampler bug)")
        return RolloutBatch(leaves, self.tree.nodes, self.roots, self._stats(leaves, counters, wall))

    def _leaf(self, p: _Path) -> Leaf:
        ids = self.tree.path(p.node_id)
        spans = [(self.tree.nodes[n].start, self.tree.nodes[n].end) for n in ids]
        return Leaf(p.prompt_index, self.prompts[p.prompt_index], p.token_ids, p.logprobs, p.entropies, ids, spans,
                    p.finish_reason)

    def _stats(self, leaves: list[Leaf], counters: dict[str, float], wall: float) -> RolloutStats:
        distinct = sum(len(p) for p in self.prompts) + sum(n.num_tokens for n in self.tree.nodes.values())
        held = sum(len(leaf.prompt_ids) + len(leaf.completion_ids) for leaf in leaves)
        return RolloutStats(
            num_prompts=len(self.prompts),
            num_leaves=len(leaves),
            num_missing_leaves=self.spec.leaves_per_prompt * len(self.prompts) - len(leaves),
            num_nodes=len(self.tree.nodes) - len(self.roots),
            flat_prefill_tokens=sum(len(leaf.prompt_ids) for leaf in leaves),
            flat_decode_tokens=sum(max(len(leaf.completion_ids) - 1, 0) for leaf in leaves),
            completion_tokens=sum(len(leaf.completion_ids) for leaf in leaves),
            shared_kv_tokens=held - distinct,
            kv_bytes_per_token=int(self.backend.kv_bytes_per_token),
            wall_seconds=wall,
            **counters,
        )


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {k: int(after[k] - before[k]) for k in _TOKEN_COUNTERS}
    out.update({k: float(after[k] - before[k]) for k in _TIME_COUNTERS})
    return out
