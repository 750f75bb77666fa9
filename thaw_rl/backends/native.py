"""``NativeBackend``: the rollout-backend protocol over thaw-rl's own ``ThawEngine``.

Handles are engine ``Session`` objects; every call is the engine call of the same name. The engine
runs the caller's model object, so after an optimizer step the weights are already live and
``update_weights`` only has to move the engine to the next weight version, which drops the prefix cache
(cached KV was computed with the old weights) and makes older snapshots unrestorable here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from thaw_rl.engine import Completion, SamplingParams, Session, ThawEngine
from thaw_rl.backends.base import COUNTER_KEYS


class NativeBackend:
    """A ``RolloutBackend`` backed by one ``ThawEngine`` (build it here, or pass ``engine=``)."""

    def __init__(self, model: torch.nn.Module | None = None, tokenizer=None, *, engine: ThawEngine | None = None,
                 **engine_kwargs) -> None:
        if (model is None) == (engine is None):
            raise ValueError("NativeBackend needs exactly one of model (to build a ThawEngine) or engine=.")
        if engine is not None and engine_kwargs:
            raise ValueError(f"engine= was given, so {sorted(engine_kwargs)} would be ignored; drop them.")
        self.engine = engine if engine is not None else ThawEngine(model, tokenizer, **engine_kwargs)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.engine.spec.bytes_per_token

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[Session]:
        return self.engine.prefill_many(prompts)

    def fork(self, handle: Session, n: int, at: int | None = None) -> list[Session]:
        return self.engine.fork(handle, n, at=at)

    def generate(self, handles: Sequence[Session],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        return self.engine.generate(handles, list(params) if isinstance(params, (list, tuple)) else params)

    def free(self, handle: Session) -> None:
        self.engine.free(handle)

    def counters(self) -> dict[str, float]:
        st = self.engine.stats
        out = {
            "prefill_tokens": st.prompt_tokens_computed,
            "decode_tokens": st.tokens_computed - st.prompt_tokens_computed,
            "reused_tokens": st.prompt_tokens_reused,
            "sampled_tokens": st.tokens_generated,
            "num_forks": st.num_forks,
            "fork_seconds": st.fork_seconds,
            # snapshot/restore timings appear once the engine counts them; 0 until then
            "snapshot_seconds": getattr(st, "snapshot_seconds", 0.0),
            "restore_seconds": getattr(st, "restore_seconds", 0.0),
            "cascade_steps": st.num_cascade_steps,
        }
        assert set(out) == set(COUNTER_KEYS)
        return out

    def update_weights(self, state_dict: dict | None = None) -> None:
        if state_dict is not None:
            self.engine.model.load_state_dict(state_dict)
        self.engine.set_weight_version(self.engine.weight_version + 1)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def __repr__(self) -> str:
        return f"NativeBackend({type(self.engine.model).__name__}, kv_bytes_per_token={self.kv_bytes_per_token})"
