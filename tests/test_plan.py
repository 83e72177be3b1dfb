"""bond_jax.plan: per-device bytes against hand computation, the CLI's tables and warnings, bad meshes."""

import os
import subprocess
import sys

import pytest

from bond_jax import plan
from bond_jax.models import presets
from configs import dialogue

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def _config(preset="tiny", **changes):
  config = dialogue.get_config(preset)
  config.reward_training.model = "transformer"  # the hand computations count a reward network's params
  if preset == "tiny":  # the hand computations below use P = 96 prompt and T = 24 new tokens, 16 prompts
    config.data.prompt_buckets, config.sampling.max_new_tokens = (96,), 24
    config.train.batch_size = 16
  for key, value in changes.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def _rows(config, **mesh):
  return {row.component: row for row in plan.plan(config, dict(dict(data=1, fsdp=1, tensor=1), **mesh))}


def test_tiny_by_hand_fsdp_only():
  cfg = presets.get("tiny")  # f32 params and compute, no remat, tied embeddings
  n = cfg.num_params()
  assert n == 2048 * 256 + 4 * (256 * 64 * (4 + 4) + 4 * 64 * 256 + 3 * 256 * 768 + 2 * 256) + 256
  rows = _rows(_config(), data=2, fsdp=4)
  # every parameter has an embed axis: exactly num_params / fsdp elements per device, 4 bytes each
  for name in ("policy params", "anchor params", "reference params", "gradients"):
    assert rows[name].bytes == n * 4 / 4
  assert rows["reward model params"].bytes == (n + 256) * 4 / 4  # + scalar head [D]
  assert rows["adam mu+nu (f32)"].bytes == 2 * n * 4 / 4
  # B=16, P=96, T=24: cache slots B*P + 2*B*(T-1) over data*fsdp = 8; 4 layers, k and v, K=2, Dh=64, f32
  assert rows["kv cache (anchor, n=2)"].bytes == 4 * 2 * 2 * 64 * 4 * (16 * 96 + 2 * 16 * 23) / 8
  b, P, T = 16 // 8, 96, 24
  L = P + T
  assert rows["logits (f32)"].bytes == 3 * b * T * 2048 * 4  # the LM head on response positions only
  fwd = lambda r, q, k: r * q * 4 * (4 * 256 + 2 * (4 + 2) * 64 + 3 * 768) + r * 4 * q * k * (4 + 4)
  # the gradient call: each prompt once, its 2 responses against its cache (repeated for them: 3 b caches)
  grad_layer = fwd(b, P, P) + fwd(2 * b, T, L) + 3 * b * L * 2 * 2 * 64 * 4
  assert rows["activations (no remat)"].bytes == pytest.approx(4 * grad_layer + fwd(b, L, L))
  # gathered (XLA keeps every layer's, and gathers again for the backward): the whole model, f32, twice
  assert rows["gathered weights x2"].bytes == 2 * n * 4
  assert rows["optimizer update (f32)"].bytes == n * 4 / 4
  # sampling: the decode layout's copies (q/k/v, gate/up, head) and the model gathered for the prefill
  # and the decode, whole because tensor = 1
  layer_qkv_gate_up = 256 * 64 * 8 + 2 * 256 * 768
  assert rows["decode weights (fused copies)"].bytes == (4 * layer_qkv_gate_up + 2048 * 256) * 4 / 4
  assert rows["gathered weights (prefill)"].bytes == rows["gathered weights (decode)"].bytes == n * 4
  assert "sampled weights (bfloat16)" not in rows and "grad accumulator (f32)" not in rows
  persistent = (3 * n + (n + 256) + 2 * n) * 4 / 4  # policy, anchor, reference; reward model; adam
  update = sum(r.bytes for r in rows.values() if r.phase == "update")
  assert plan.peak_bytes(list(rows.values())) == pytest.approx(persistent + update)


def test_rewards_computed_on_the_host_hold_no_reward_model_params():
  network = _rows(_config(), fsdp=4)
  persistent = lambda rows: sum(r.bytes for r in rows.values() if r.phase == "persistent")
  bag_of_words, reward_fn = _config(reward_training__model="bag_of_words"), _config()
  reward_fn.reward_fn = "pkg.mod:fn"
  for config in (bag_of_words, reward_fn):
    rows = _rows(config, fsdp=4)
    assert "reward model params" not in rows
    assert persistent(network) - persistent(rows) == network["reward model params"].bytes > 0
  bag_of_words.reward_model = "/some/workdir"  # the plan reads no files: a given reward model counts as a
  assert "reward model params" in _rows(bag_of_words, fsdp=4)  # network of the policy's preset


def test_tensor_sharding_remat_and_accumulation():
  config = _config(optimizer__grad_accum_steps=2)
  config.model.overrides = dict(remat=True, compute_dtype="bfloat16")
  rows = _rows(config, fsdp=2, tensor=2)
  d, h, kv, dh, m, v, layers = 256, 4, 2, 64, 768, 2048, 4
  # embed over fsdp=2, heads/kv/mlp/vocab over tensor=2; norm scales only over fsdp
  per_layer = (d * dh * (h + 2 * kv) + h * dh * d + 3 * d * m) / 4 + 2 * d / 2
  lm = v * d / 4 + layers * per_layer + d / 2
  assert rows["policy params"].bytes == lm * 4
  assert rows["sampled weights (bfloat16)"].bytes == lm * 2
  assert rows["grad accumulator (f32)"].bytes == lm * 4
  b, P, T = 16 // 2 // 2, 96, 24  # B / grad_accum / (data * fsdp)
  L = P + T
  fwd = lambda r, q, k: r * q * 2 * (4 * d + 2 *
                                     (h + kv) * dh / 2 + 3 * m / 2) + r * (h / 2) * q * k * (4 + 2)
  grad_layer = fwd(b, P, P) + fwd(2 * b, T, L) + 3 * b * L * 2 * (kv / 2) * dh * 2
  assert rows["activations (remat)"].bytes == pytest.approx(layers * (b * P + 2 * b * T) * d * 2 +
                                                            2 * grad_layer)
  assert rows["kv cache (anchor, n=2)"].bytes == layers * 2 * (kv // 2) * dh * 2 * (16 * 96 + 2 * 16 * 23) / 2
  assert rows["logits (f32)"].bytes == 3 * b * T * (v / 2) * 4


def test_gemma_7b_numbers():
  rows = _rows(_config("gemma_7b"), fsdp=16)
  n = presets.get("gemma_7b").num_params()
  assert rows["policy params"].bytes == n * 4 / 16
  assert rows["policy params"].gib == pytest.approx(1.988, abs=1e-3)
  # 28 layers * 2 * 16 kv heads * 256 * bf16 * (128 * 512 + 2 * 128 * 255) slots / 16 devices
  assert rows["kv cache (anchor, n=2)"].gib == pytest.approx(28 * 2 * 16 * 256 * 2 * 130816 / 16 / GIB)
  assert rows["logits (f32)"].gib == pytest.approx(3 * 8 * 256 * 256_000 * 4 / GIB)
  assert plan.peak_bytes(list(rows.values())) / GIB == pytest.approx(59.50, abs=0.01)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "bond_jax.plan", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=60)


def test_cli_tables_and_warning():
  out = _cli("--config=configs/dialogue.py:gemma_7b", "--mesh=data=1,fsdp=16,tensor=1", "--accelerator=v5p")
  assert out.returncode == 0, out.stderr
  assert "gemma_7b: 8.538B params" in out.stdout and "mesh data=1 fsdp=16 tensor=1" in out.stdout
  assert "TOTAL (peak)                      59.50" in out.stdout and "WARNING" not in out.stdout
  assert "policy params                      1.99  persistent embed/fsdp=16" in out.stdout
  # one v5e chip cannot hold gemma_7b
  text = plan.report(_config("gemma_7b"), "fsdp=1", "v5e")
  assert "WARNING: 443.19 GiB per device exceeds the 16 GiB of a v5e device" in text
  assert "use more fsdp (or tensor)" in text


def test_report_gemma_2b_and_devices():
  text = plan.report(_config("gemma_2b"), "", "v4", num_devices=16)  # config mesh fsdp=-1 -> 16
  assert "gemma_2b: 2.506B params" in text and "mesh data=1 fsdp=16 tensor=1" in text
  # the update's logits on response positions only: 22.82 GiB, under v4's 32 (34.24 before, a warning)
  assert "TOTAL (peak)                      22.82" in text and "WARNING" not in text


@pytest.mark.parametrize("preset, mesh, message", [
    ("gemma_2b", "fsdp=4,tensor=2", "num_kv_heads=1 \\(gemma_2b\\) is not divisible by tensor=2"),
    ("gemma_7b", "fsdp=5", "d_model \\(embed\\)=3072 \\(gemma_7b\\) is not divisible by fsdp=5"),
    ("gemma_7b", "fsdp=2,tensor=32", "num_kv_heads=16 \\(gemma_7b\\) is not divisible by tensor=32"),
    ("gemma_7b", "data=3,fsdp=1", "train.batch_size=128 is not divisible by grad_accum_steps"),
    ("gemma_7b", "fsdp=-1", "fsdp=-1; give the device count"),
    ("gemma_7b", "pipe=2", "mesh entry 'pipe=2' is not AXIS=SIZE"),
    ("gemma_7b", "fsdp=x", "size 'x' is not an integer"),
])
def test_bad_mesh_one_line_errors(preset, mesh, message):
  with pytest.raises(ValueError, match=message) as info:
    plan.report(_config(preset), mesh, "v5p")
  assert "\n" not in str(info.value)


def test_cli_error_is_one_line():
  out = _cli("--config=configs/dialogue.py:gemma_2b", "--mesh=fsdp=8,tensor=2", "--accelerator=v5p")
  assert out.returncode == 2
  assert out.stderr.strip().startswith("error: num_kv_heads=1 (gemma_2b) is not divisible by tensor=2")
  assert len(out.stderr.strip().splitlines()) == 1
  with pytest.raises(ValueError, match="accelerator 'tpu9' is not known; allowed: v4, v5e, v5p"):
    plan.report(_config("gemma_2b"), "fsdp=8", "tpu9")


def test_lora_rows_and_the_embedded_runs_params_and_optimizer_memory():
  config = _config()
  config.lora.update(rank=16, base_dtype="bfloat16")
  rows = _rows(config)
  n = presets.get("tiny").num_params()
  # rank 16 on q, k, v, o, gate, up, down of 4 layers: A [in, 16] + B [16, out]
  per_layer = 16 * ((256 + 256) + (256 + 128) * 2 + (256 + 256) + (256 + 768) * 2 + (768 + 256))
  assert rows["policy adapters (r=16)"].bytes == rows["anchor adapters (EMA)"].bytes == 4 * per_layer * 4
  assert rows["reference = base (shared)"].bytes == n * 2  # bfloat16
  assert rows["adam mu+nu (f32, adapters)"].bytes == 2 * 4 * per_layer * 4
  assert rows["gradients (adapters)"].bytes == 4 * per_layer * 4
  persistent = lambda rows: sum(r.bytes for r in rows.values() if r.phase == "persistent")
  full = _rows(_config())
  assert persistent(full) / persistent(rows) >= 3  # the embedded comparison's claim (BENCHMARKS.md)
  text = plan.full_vs_lora(_config("gemma_7b"), "fsdp=8", "h100", 16)
  assert "policy adapters (r=16)" in text and "x smaller" in text and "h100 HBM 80" in text


def test_plan_totals_within_15_percent_of_xla_memory_analysis():
  """The update and the sampler compiled on the 8-device CPU mesh (tiny; data 2 x fsdp 4), full and LoRA:
  the persistent bytes agree exactly (the same arrays), the peak within 15%."""
  import jax
  from bond_jax import plan_check, sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  for rank, base_dtype, reward in ((0, "", "transformer"), (16, "bfloat16", "bag_of_words")):
    config = dialogue.get_config("tiny")
    config.reward_training.model = reward  # a reward network on the device, or rewards on the host
    config.mesh.update(data=2, fsdp=4)
    config.sampling.max_new_tokens = 32
    config.lora.update(rank=rank, base_dtype=base_dtype)
    ours, theirs = plan_check.planned(config, dict(mesh.shape)), plan_check.measured(config, mesh)
    assert ours.persistent == pytest.approx(theirs.persistent, rel=1e-3)
    assert ours.peak == pytest.approx(theirs.peak, rel=0.15), (rank, ours, theirs)
  assert len(jax.devices()) == 8
