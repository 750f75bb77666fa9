"""What a tree rollout returns: the leaves (one per sampled completion), the tree, and what it cost.

Positions inside a completion are *completion offsets*: offset 0 is the first token after the prompt.
A node owns the half-open span ``[start, end)`` of completion offsets that every leaf below it shares;
the root of each prompt is the prompt itself and owns the empty span ``[0, 0)``. A trainer that
credits per node (TreeRL, TreePO) gives the tokens of a leaf's span ``spans[i]`` the value of node
``node_ids[i]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Node:
    """One node of a rollout tree: the tokens ``[start, end)`` shared by every leaf below it."""

    node_id: int
    parent_id: int | None  # None for a prompt's root
    prompt_index: int
    start: int  # completion offset of the node's first token
    end: int  # one past its last token
    children: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class Leaf:
    """One sampled completion and where it sits in its prompt's tree."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]  # the whole path below the prompt
    logprobs: list[float]  # log softmax(logits / T) of each completion token, as sampled
    entropies: list[float]  # entropy (nats) of the distribution each token was sampled from
    node_ids: list[int]  # root (the prompt) -> ... -> this leaf's own node
    spans: list[tuple[int, int]]  # completion-offset span of each node in node_ids (the root's is (0, 0))
    finish_reason: str  # "stop" or "length"

    @property
    def node_id(self) -> int:
        return self.node_ids[-1]

    @property
    def segment_starts(self) -> list[int]:
        """Completion offsets where a new node begins (the places this path was forked from others)."""
        return [s for s, _ in self.spans[1:]]


@dataclass
class RolloutStats:
    """What one rollout computed, and what a flat sampler would have computed for the same leaves.

    The flat sampler prefills each leaf's prompt on its own (``prompt_len`` tokens per leaf) and decodes
    each completion on its own (``len - 1`` tokens: the last sampled token is never fed back), which is
    what vLLM without prefix caching or ``model.generate(num_return_sequences=n)`` compute.
    """

    num_prompts: int = 0
    num_leaves: int = 0
    num_missing_leaves: int = 0  # leaves_per_prompt x prompts - leaves: lost to early stops (entropy: budget unused)
    num_nodes: int = 0  # nodes below the roots
    prefill_tokens: int = 0  # computed by the backend (counter deltas)
    decode_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens the backend's prefix cache served
    sampled_tokens: int = 0
    flat_prefill_tokens: int = 0
    flat_decode_tokens: int = 0
    completion_tokens: int = 0  # sum of the leaves' completion lengths
    shared_kv_tokens: int = 0  # sum over leaves of (prompt + completion) minus distinct tree tokens
    kv_bytes_per_token: int = 0
    num_forks: int = 0
    fork_seconds: float = 0.0
    snapshot_seconds: float = 0.0
    restore_seconds: float = 0.0
    cascade_steps: int = 0  # decode steps whose attention read each group's shared prefix once (counter delta)
    wall_seconds: float = 0.0

    @property
    def computed_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def flat_tokens(self) -> int:
        return self.flat_prefill_tokens + self.flat_decode_tokens

    @property
    def savings(self) -> float:
        """Fraction of the flat sampler's computed tokens the tree did not compute."""
        return 1.0 - self.computed_tokens / self.flat_tokens if self.flat_tokens else 0.0

    @property
    def compute_ratio(self) -> float:
        """Flat tokens per tree token (2.0 = the tree computed half)."""
        return self.flat_tokens / self.computed_tokens if self.computed_tokens else 0.0

    @property
    def kv_bytes_shared(self) -> int:
        return self.shared_kv_tokens * self.kv_bytes_per_token

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens delivered (over all leaves) per wall second."""
        return self.completion_tokens / self.wall_seconds if self.wall_seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        """Every counter and derived number, flat, e.g. for a trainer's ``thaw/...`` metrics."""
        out = asdict(self)
        for name in ("computed_tokens", "flat_tokens", "savings", "compute_ratio", "kv_bytes_shared",
                     "tokens_per_second"):
            out[name] = getattr(self, name)
        return out

    def summary(self) -> str:
        missing = f" ({self.num_missing_leaves} missing)" if self.num_missing_leaves else ""
        return (
            f"{self.num_prompts} prompts -> {self.num_leaves} leaves{missing}, {self.num_nodes} nodes | "
            f"computed {self.computed_tokens:,} tok (prefill {self.prefill_tokens:,}, decode {self.decode_tokens:,}) "
            f"vs flat {self.flat_tokens:,} -> {self.compute_ratio:.2f}x, {self.savings:.1%} saved | "
            f"KV shared {self.kv_bytes_shared / 2**20:.1f} MiB | "
            f"{self.wall_seconds:.2f} s, {self.tokens_per_second:,.0f} tok/s, "
            f"{self.num_forks} forks in {self.fork_seconds * 1e3:.1f} ms"
        )


@dataclass
class RolloutBatch:
    """Leaves in a fixed order (prompt-major, then depth-first tree order), the tree, and the stats."""

    leaves: list[Leaf]
    nodes: dict[int, Node]  # node id -> node; ids are unique in the batch
    roots: list[int]  # root node id of each prompt
    stats: RolloutStats

    def __len__(self) -> int:
        return len(self.leaves)

    def __iter__(self):
        return iter(self.leaves)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [leaf.prompt_ids for leaf in self.leaves]

    @property
    def completion_ids(self) -> list[list[int]]:
        return [leaf.completion_ids for leaf in self.leaves]

    @property
    def logprobs(self) -> list[list[float]]:
        return [leaf.logprobs for leaf in self.leaves]

    @property
    def num_leaves_per_prompt(self) -> list[int]:
        counts = [0] * len(self.roots)
        for leaf in self.leaves:
            counts[leaf.prompt_index] += 1
        return counts

    def parent(self, node_id: int) -> int | None:
        return self.nodes[node_id].parent_id

    def span(self, node_id: int) -> tuple[int, int]:
        node = self.nodes[node_id]
        return node.start, node.end

    def leaves_under(self, node_id: int) -> list[int]:
        """Indices (into ``leaves``) of the leaves whose path goes through ``node_id``."""
        return [i for i, leaf in enumerate(self.leaves) if node_id in leaf.node_ids]
