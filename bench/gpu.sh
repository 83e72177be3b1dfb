#!/usr/bin/env bash
# One-GPU benchmark, under 8 minutes: the 1B-class shapes (bench/large_shapes.py: llama_1b and gemma_2b,
# random weights: decode tokens/s against the card's HBM-bandwidth bound, the J-BOND update's MFU),
# sampling throughput (bench/sampling.py, `small` preset) and 20 J-BOND steps of the `small` preset
# through the real CLI (bond_jax.train), then tokens/s and MFU.
#
#   bash bench/gpu.sh            # PYTHON=/path/to/python to pick the interpreter (default .venv, python3)
#   SMOKE=1 bash bench/gpu.sh    # CPU smoke (tests/test_bench.py): the 1B-class section only, 1 layer,
#                                # a small vocabulary and MLP, 2 prompts x 2 tokens
#
# Nothing is installed: the machine may not reach PyPI. It uses the Python environment it finds (jax with
# CUDA, plus this repository's requirements) and stops with a clear message when JAX sees no GPU.
# MFU of the small run = model FLOPs / step time / the GPU's dense bf16 peak (H100/H200 989, A100 312
# TFLOP/s); model FLOPs count 2 * matmul params per token for every forward token (prefills, decode,
# reward scoring, the update's 2 gradient calls at 3x and its anchor and reference calls), attention
# excluded, prompts at data.max_prompt_len (an upper bound: prompts are bucketed). The small preset
# computes in float32 (TF32 tensor cores on these GPUs), so its MFU against the bf16 peak is a lower bound
# on what bf16 gets. Time budget: 1B-class shapes <= 240 s, sampling <= 90 s, the small run <= 150 s.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi

if [[ -n "${SMOKE:-}" ]]; then
  echo "== SMOKE: 1B-class shapes shrunk to 1 layer on $("$py" -c 'import jax; print(jax.default_backend())') =="
  exec "$py" -m bench.large_shapes --overrides=num_layers=1,vocab_size=512,mlp_dim=1024 --batch=2 \
    --prompt_len=4 --new_tokens=2 --update_batch=2 --repeats=1
fi
if ! "$py" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  echo "error: JAX in $py sees no GPU (backend: $("$py" -c 'import jax; print(jax.default_backend())' \
2>&1 | tail -1)); install jax[cuda12] matching jax==0.10.2 on this machine, then rerun" >&2
  exit 3
fi
if ! "$py" -c "import bond_jax.train" 2>/dev/null; then
  echo "error: $py cannot import bond_jax.train; install the requirements (pip install -e .)" >&2
  exit 3
fi
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "GPU: ${gpu_name:-unknown}"

echo "== 1B-class shapes: bench/large_shapes.py (decode rows 64, update 16 prompts x 3 rows) =="
timeout 240 "$py" -m bench.large_shapes --presets=llama_1b,gemma_2b --batch=64 --update_batch=16 \
  || echo "bench/large_shapes.py failed or passed 240 s (exit $?)"

echo "== sampling: bench/sampling.py --presets=small (transformers baseline on CPU torch) =="
if "$py" -c "import torch, transformers" 2>/dev/null; then
  timeout 90 "$py" -m bench.sampling --presets=small --dtypes=float32,bfloat16 --repeats=3 \
    || echo "bench/sampling.py failed or passed 90 s (exit $?)"
else
  echo "bench/sampling.py not run: it compares against transformers.generate and needs torch + transformers"
fi

echo "== 20 J-BOND steps of the small preset (SFT and reward model first, shortened) =="
workdir="$(mktemp -d)"
log="$workdir/train.log"
timeout 150 "$py" -m bond_jax.train --config=configs/dialogue.py:small --workdir="$workdir" \
  --config.train.steps=20 --config.train.log_every=1 --config.train.eval_every=1000 \
  --config.train.checkpoint_every=1000 --config.eval.num_prompts=8 \
  --config.sft.steps=100 --config.sft.eval_every=1000 \
  --config.reward_training.steps=50 --config.reward_training.eval_every=1000 2>&1 | tee "$log"

GPU_NAME="$gpu_name" "$py" - "$log" "$workdir/bond/metrics.jsonl" <<'EOF'
"""Steady step time from the metrics wall times (steps 5..20), then tokens/s and MFU."""
import json, os, sys
from configs import dialogue
from bond_jax.models import presets

log, metrics_path = sys.argv[1:3]
records = [json.loads(line) for line in open(metrics_path)]
times = {r["step"]: r["wall_time"] for r in records if r.get("kind") == "train" and "wall_time" in r}
if 5 not in times or 20 not in times:
  sys.exit(f"error: train metrics for steps 5 and 20 not found in {metrics_path}")
# steps 6..20 (compilation happens in steps 1-2); metrics lines are written once per step (log_every=1)
step_time = (times[20] - times[5]) / 15
c = dialogue.get_config("small")
cfg = presets.get(c.model.preset)
B, P, T = c.train.batch_size, c.data.max_prompt_len, c.sampling.max_new_tokens
L = P + T
lengths = [r["response_length"] for r in map(json.loads, open(metrics_path))
           if r.get("kind") == "train" and r["step"] > 5 and "response_length" in r]
mean_len = sum(lengths) / len(lengths) if lengths else T
d, h, kv, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
matmul_params = cfg.num_layers * (d * hd * (h + 2 * kv) + h * hd * d + 3 * d * m) + d * cfg.vocab_size
forward_tokens = 2 * B * P + 3 * B * T + 3 * B * L + 3 * 2 * B * L + 2 * B * L
flops = 2 * matmul_params * forward_tokens
name = os.environ.get("GPU_NAME", "")
peak = 989e12 if ("H100" in name or "H200" in name) else 312e12 if "A100" in name else None
print(f"J-BOND step (small, B={B}, {P}+{T} tokens): {step_time * 1e3:.1f} ms")
print(f"sampled tokens/s: {3 * B * mean_len / step_time:,.0f} (mean response {mean_len:.1f} tokens, "
      f"3 samples per prompt); at most {3 * B * T / step_time:,.0f}")
print(f"model FLOP/s: {flops / step_time / 1e12:.2f} TFLOP/s"
      + (f", MFU {flops / step_time / peak:.2%} of {peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else
         ", MFU: unknown GPU peak"))
EOF
