"""Per-device memory plan of a J-BOND run, from the shapes alone (nothing is allocated or compiled).

    python -m bond_jax.plan --config=configs/dialogue.py:gemma_7b --mesh=data=1,fsdp=16,tensor=1 --accelerator=v5p

Sizes follow the code: parameters come from jax.eval_shape of the real modules with their logical axis
names, divided by the mesh axes of sharding.LOGICAL_AXIS_RULES (embed -> fsdp; vocab, mlp, heads,
kv_heads -> tensor); activations put rows on ('data', 'fsdp') and heads / mlp / vocab on 'tensor'.
Notation: B prompts (train.batch_size), m = optimizer.grad_accum_steps, b = B / m / (data * fsdp)
prompt rows per device in one update call, P = max(data.prompt_buckets) (the widest prompt; a longer
one is left-truncated to it), T = sampling.max_new_tokens,
L = P + T, D d_model, H heads, K kv heads, Dh head_dim, M mlp_dim, V vocab, t = tensor,
s = bytes of the compute dtype.

Phases (a run's peak is persistent + max(sampling, update): the KV cache is gone before the update):
- persistent: policy, anchor, reference, reward model (backbone + head; none when rewards are computed on
  the host: a reward_fn or a bag-of-words reward) in param_dtype; Adam mu and nu
  (2 x policy, float32).
- sampling (rollout.jbond_batch: generate(policy, n=1) then generate(anchor, n=2)); the anchor call is
  the larger: its prompt cache is shared by the 2 samples (sampling.py), so the KV cache holds
  layers * 2 (k, v) * K/t * Dh * s * (B * P + 2 * B * (T - 1)) / (data * fsdp) bytes; that is less than
  the naive 3 * B rows * (P + T) slots. Plus a compute-dtype copy of the sampled weights when
  param_dtype != compute_dtype (decode.cast_weights). Reward scoring (no gradient) is smaller than
  the update and not listed.
- update (update.jbond_loss_fn): one call with gradient (the policy sample and the best anchor sample of
  each of b prompts: the prompt's forward once, b rows of P tokens, then the 2b responses of T tokens
  against its cache repeated for them; scoring._shared_prompt_hidden) and up to two without (anchor,
  reference). Forward tensors of one layer on r rows of q queries over k keys:
      S(r, q, k) = r * q * s * (4 D + 2 (H + K) Dh / t + 3 M / t) + r * (H / t) * q * k * (4 + s)
  (x-sized tensors; q, k, v and attention output; MLP gate, up, product; float32 scores + probs); the
  gradient call's layer holds G = S(b, P, P) + S(2b, T, L) + its cache and the repeat, 3 b L 2 K/t Dh s.
  With remat: the layer inputs are kept, layers * (b P + 2b T) * D * s, plus one layer recomputed with
  its gradients, 2 G. Without remat: every layer's G, plus one layer's gradients, S(b, L, L).
  Logits (the LM head on response positions only): 3 * b * T * V/t * 4 bytes (the float32 log-softmax of
  the gradient call's 2b rows is kept for the backward pass, plus one call's raw logits in flight; with
  bond.kl_estimator='per_position' the policy sample's rows hold both models' logits of 32 positions at a
  time instead, scoring.sequence_kl_fn, which is less for T > 32). Gradients in param_dtype (a float32
  accumulator too when m > 1), and with fsdp > 1 (or a dtype cast) one all-gathered layer plus the
  embedding in the compute dtype, split only over tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from bond_jax import workdir as workdir_lib

GIB = 2**30
MESH_AXES = ("data", "fsdp", "tensor")
# Per-device HBM in GiB (None: no limit checked).
ACCELERATORS: dict[str, float | None] = {
    "v4": 32,
    "v5e": 16,
    "v5p": 95,
    "v6e": 32,
    "a100": 80,
    "h100": 80,
    "h200": 141,
    "cpu": None
}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# logical names (after the layer axis) of each projection's weight, and of the head (the embedding's
# contiguous transpose, or lm_head)
_PROJECTIONS = {
    "q": ("embed", "heads", "head_dim"),
    "k": ("embed", "kv_heads", "head_dim"),
    "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"),
    "gate": ("embed", "mlp"),
    "up": ("embed", "mlp"),
    "down": ("mlp", "embed")
}
_HEAD = (("vocab", "embed"), ("embed", "vocab"))


@dataclasses.dataclass(frozen=True)
class Row:
  component: str
  bytes: float  # per device
  phase: str  # persistent | sampling | update
  sharding: str

  @property
  def gib(self) -> float:
    return self.bytes / GIB


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=16,tensor=1' -> {'data': 1, 'fsdp': 16, 'tensor': 1} (missing axes are 1)."""
  shape = {}
  for item in filter(None, text.split(",")):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in MESH_AXES:
      raise ValueError(f"mesh entry {item!r} is not AXIS=SIZE with AXIS in {', '.join(MESH_AXES)}")
    try:
      shape[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"mesh entry {item!r}: size {value!r} is not an integer") from None
  return {axis: shape.get(axis, 1) for axis in MESH_AXES}


def resolve_mesh(mesh_shape: Mapping[str, int], num_devices: int | None = None) -> dict[str, int]:
  """Mesh sizes with a -1 axis resolved from num_devices; every size must end up >= 1."""
  sizes = {axis: int(mesh_shape.get(axis, 1)) for axis in MESH_AXES}
  unknown = sorted(set(mesh_shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown[0]!r}; allowed: {', '.join(MESH_AXES)}")
  free = [axis for axis, size in sizes.items() if size == -1]
  if any(size == 0 or size < -1 for size in sizes.values()) or len(free) > 1:
    raise ValueError(f"mesh {sizes}: sizes must be >= 1, with at most one -1")
  if free:
    known = math.prod(size for size in sizes.values() if size != -1)
    if num_devices is None:
      raise ValueError(f"mesh {sizes} has {free[0]}=-1; give the device count (--devices) or every size")
    if num_devices % known:
      raise ValueError(f"mesh {sizes} does not fit {num_devices} devices: {num_devices} is not divisible "
                       f"by {known}")
    sizes[free[0]] = num_devices // known
  return sizes


def model_config(config: Any):
  """The run's ModelConfig (presets.from_config; vocab from the preset unless overridden: a tokenizer
  trained here has data.vocab_size pieces, equal to the tiny/small presets')."""
  from bond_jax.models import presets
  return presets.from_config(config.model)


def _param_shapes(cfg, kind: str) -> list[tuple[tuple[int, ...], tuple]]:
  """(shape, logical names) of every parameter of `kind` (models/params.py, shapes only); layer
  parameters are stacked on a leading 'layers' axis."""
  import jax
  from bond_jax.models import params as params_lib
  cfg = cfg.replace(scan_layers=True)  # same parameters, stacked on a leading 'layers' axis
  shapes = jax.tree.leaves(params_lib.shapes(cfg, kind))
  names = jax.tree.leaves(params_lib.logical_axes(cfg, kind),
                          is_leaf=lambda x: isinstance(x, tuple) or x is None)
  return [(tuple(s.shape), n or (None,) * len(s.shape)) for s, n in zip(shapes, names)]


def _shard_elements(shapes, mesh: Mapping[str, int]) -> float:
  """Elements per device of a parameter list placed by sharding.py's rules on a mesh of these sizes."""
  from bond_jax import sharding
  return sum(math.prod(sharding.local_shape(shape, names, mesh)) for shape, names in shapes)


def check_mesh(cfg, config: Any, mesh: Mapping[str, int]) -> None:
  """One-line ValueError for the first model or batch dimension the mesh does not divide."""
  t, dp = mesh["tensor"], mesh["data"] * mesh["fsdp"]
  if cfg.num_kv_heads % t:
    raise ValueError(
        f"num_kv_heads={cfg.num_kv_heads} ({config.model.preset}) is not divisible by tensor={t}: the rules "
        f"shard kv_heads over 'tensor' and sharding.check_divisible rejects these k/v params (kv heads are "
        f"not replicated); use a tensor size dividing {cfg.num_kv_heads} (e.g. tensor=1) and more fsdp")
  for name, dim, axis, size in (("d_model (embed)", cfg.d_model, "fsdp", mesh["fsdp"]),
                                ("num_heads", cfg.num_heads, "tensor", t), ("mlp_dim", cfg.mlp_dim, "tensor",
                                                                            t), ("vocab_size", cfg.vocab_size,
                                                                                 "tensor", t)):
    if dim % size:
      raise ValueError(f"{name}={dim} ({config.model.preset}) is not divisible by {axis}={size}; "
                       f"use a {axis} size that divides {dim}")
  batch, accum = config.train.batch_size, config.optimizer.grad_accum_steps
  if batch % (accum * dp):
    raise ValueError(f"train.batch_size={batch} is not divisible by grad_accum_steps * data * fsdp = "
                     f"{accum} * {mesh['data']} * {mesh['fsdp']} = {accum * dp}; the update's rows would "
                     f"not shard evenly")


def _adapter_shapes(cfg, lora) -> list[tuple[tuple[int, ...], tuple]]:
  """(shape, logical names) of every LoRA adapter (models/lora.py) on an 'lm' tree of cfg."""
  import jax
  from bond_jax.models import lora as lora_lib
  from bond_jax.models import params as params_lib
  shapes = jax.tree.leaves(lora_lib.adapter_shapes(cfg, lora, params_lib.shapes(cfg, "lm")))
  names = jax.tree.leaves(params_lib.adapter_axes(cfg, lora), is_leaf=lambda x: isinstance(x, tuple))
  return [(tuple(s.shape), n) for s, n in zip(shapes, names)]


def reward_on_device(config: Any) -> bool:
  """False when the run's rewards are computed on the host (a reward_fn, or this workdir's bag-of-words
  reward stage): no reward model params then. A given reward_model path counts as a network of the
  policy's preset (the plan reads no files)."""
  if config.get("reward_fn"):
    return False
  return bool(config.get("reward_model")) or not workdir_lib.is_bag_of_words(config)


def _model_rows(cfg, lora, lm_elems: float, rm_elems: float, adapter_elems: float, how: str) -> list[Row]:
  """The model trees (the reward model's only when it is on the device: rm_elems > 0) and Adam's moments.
  With LoRA one base (in lora.base_dtype) is pi_ref and what the policy's and the anchor's adapters sit on;
  the adapters and their moments are float32."""
  ps = _BYTES[cfg.param_dtype]
  reward = [Row("reward model params", rm_elems * ps, "persistent", how)] if rm_elems else []
  if lora is None:
    return [
        Row("policy params", lm_elems * ps, "persistent", how),
        Row("anchor params", lm_elems * ps, "persistent", how),
        Row("reference params", lm_elems * ps, "persistent", how), *reward,
        Row("adam mu+nu (f32)", 2 * lm_elems * 4, "persistent", how)
    ]
  base = _BYTES[lora.base_dtype or cfg.param_dtype]
  return [
      Row(f"policy adapters (r={lora.rank})", adapter_elems * 4, "persistent", how),
      Row("anchor adapters (EMA)", adapter_elems * 4, "persistent", how),
      Row("reference = base (shared)", lm_elems * base, "persistent", how), *reward,
      Row("adam mu+nu (f32, adapters)", 2 * adapter_elems * 4, "persistent", how)
  ]


def _sampler_weights(cfg, lora, lm, mesh) -> list[Row]:
  """What a sampling call holds besides the KV cache (measured with XLA CPU's memory_analysis): a
  compute-dtype copy when the stored dtype differs; with LoRA's merge the merged projections; the decode
  layout's copies (fused q/k/v and gate/up, the contiguous head: decode.decode_weights); and with fsdp > 1
  the weights all-gathered for the prefill (in the stored dtype) and once for every decode chunk."""
  t, s = mesh["tensor"], _BYTES[cfg.compute_dtype]
  stored = (lora.base_dtype or cfg.param_dtype) if lora is not None else cfg.param_dtype
  pick = lambda names: [(shape, n) for shape, n in lm if n[1:] in names or n in names]
  rows = []
  if stored != cfg.compute_dtype:
    rows.append(
        Row(f"sampled weights ({cfg.compute_dtype})",
            _shard_elements(lm, mesh) * s, "sampling", "as params"))
  if lora is not None and lora.decode == "merge":
    merged = pick(tuple(_PROJECTIONS[name] for name in lora.targets))
    rows.append(Row("merged weights (LoRA)", _shard_elements(merged, mesh) * s, "sampling", "as params"))
  fused = pick(tuple(_PROJECTIONS[name] for name in ("q", "k", "v", "gate", "up")) + _HEAD)
  rows.append(Row("decode weights (fused copies)", _shard_elements(fused, mesh) * s, "sampling", "as params"))
  if mesh["fsdp"] > 1:
    whole = _shard_elements(lm, {"data": 1, "fsdp": 1, "tensor": t})
    prefill = _gathered_layer(cfg, lm, t) if cfg.scan_layers else whole
    rows.append(Row("gathered weights (prefill)", prefill * _BYTES[stored], "sampling", f"tensor={t}"))
    rows.append(Row("gathered weights (decode)", whole * s, "sampling", f"tensor={t}"))
  return rows


def _gathered_layer(cfg, lm, t: int) -> float:
  """Elements of one layer plus the embedding, split only over tensor: what a scanned model's all-gather
  holds at a time."""
  per_layer = [(shape[1:], names[1:]) for shape, names in lm if names[0] == "layers"]
  embed = [(shape, names) for shape, names in lm if "vocab" in names]
  return _shard_elements(per_layer + embed, {"data": 1, "fsdp": 1, "tensor": t})


def plan(config: Any, mesh_shape: Mapping[str, int], num_devices: int | None = None) -> list[Row]:
  """Per-device memory rows of a J-BOND run of `config` (a configs/*.py ConfigDict) on `mesh_shape`, with
  LoRA when config.lora.rank > 0 (models/lora.py)."""
  from bond_jax.models import lora as lora_lib
  if config.bond.algorithm != "jbond":
    raise ValueError(f"bond.algorithm={config.bond.algorithm!r}: the plan models 'jbond' only")
  mesh = resolve_mesh(mesh_shape, num_devices)
  cfg = model_config(config)
  check_mesh(cfg, config, mesh)
  lora = lora_lib.from_section(config.get("lora"))
  t, fsdp, dp = mesh["tensor"], mesh["fsdp"], mesh["data"] * mesh["fsdp"]
  ps, s = _BYTES[cfg.param_dtype], _BYTES[cfg.compute_dtype]
  D, H, K, Dh, M, V, layers = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                               cfg.vocab_size, cfg.num_layers)
  B, m = config.train.batch_size, config.optimizer.grad_accum_steps
  P, T = max(config.data.prompt_buckets), config.sampling.max_new_tokens
  L = P + T
  b = B // m // dp
  lm = _param_shapes(cfg, "lm")
  rm = _param_shapes(cfg, "reward") if reward_on_device(config) else []
  lm_elems, rm_elems = _shard_elements(lm, mesh), _shard_elements(rm, mesh)
  adapter_elems = 0.0 if lora is None else _shard_elements(_adapter_shapes(cfg, lora), mesh)
  trainable = (lm_elems * ps, lm_elems) if lora is None else (adapter_elems * 4, adapter_elems)
  params_how = f"embed/fsdp={fsdp}, heads/kv/mlp/vocab/tensor={t}"
  rows_how = f"rows/(data*fsdp)={dp}"

  rows = _model_rows(cfg, lora, lm_elems, rm_elems, adapter_elems, params_how)
  rows += _sampler_weights(cfg, lora, lm, mesh)
  kv = layers * 2 * (K // t) * Dh * s * (B * P + 2 * B * max(T - 1, 1)) / dp
  rows.append(Row("kv cache (anchor, n=2)", kv, "sampling", f"{rows_how}, kv_heads/tensor={t}"))

  def forward_tensors(r: float, queries: int, keys: int) -> float:
    return (r * queries * s * (4 * D + 2 * (H + K) * Dh / t + 3 * M / t) + r * (H / t) * queries * keys *
            (4 + s))

  grad_layer = forward_tensors(b, P, P) + forward_tensors(2 * b, T, L) + 3 * b * L * 2 * (K / t) * Dh * s
  if cfg.remat:
    acts = layers * (b * P + 2 * b * T) * D * s + 2 * grad_layer
    acts_name = "activations (remat)"
  else:
    acts = layers * grad_layer + forward_tensors(b, L, L)
    acts_name = "activations (no remat)"
  rows.append(Row(acts_name, acts, "update", f"{rows_how}, heads/mlp/tensor={t}"))
  rows.append(Row("logits (f32)", 3 * b * T * (V / t) * 4, "update", f"{rows_how}, vocab/tensor={t}"))
  if lora is not None:  # XLA keeps each adapted projection's low-rank output of both gradient calls
    # (of every adapted layer; with remat of the one layer recomputed at a time)
    width = {"q": H * Dh / t, "k": K * Dh / t, "v": K * Dh / t, "o": D, "gate": M / t, "up": M / t, "down": D}
    held = 1 if cfg.remat else len(lora.adapted_layers(cfg))
    adapted = held * sum(width[n] for n in lora.targets)
    rows.append(Row("adapter activations", 2 * b * L * s * adapted, "update", rows_how))
  rows.append(Row("gradients" + (" (adapters)" if lora else ""), trainable[0], "update", params_how))
  rows.append(Row("optimizer update (f32)", trainable[1] * 4, "update", params_how))
  if m > 1:
    rows.append(Row("grad accumulator (f32)", trainable[1] * 4, "update", params_how))
  if fsdp > 1:  # XLA keeps every layer's gathered weights for the backward, which gathers them again
    # (scanned layers too: measured on tiny, data 2 x fsdp 4, scanned 70.0 MiB vs unrolled 67.7)
    whole = _shard_elements(lm, {"data": 1, "fsdp": 1, "tensor": t}) * s
    rows.append(Row("gathered weights x2", 2 * whole, "update", f"forward + backward, tensor={t}"))
  return rows


def peak_bytes(rows: Sequence[Row]) -> float:
  """persistent + max(sampling, update): the KV cache is freed before the update runs."""
  phase = lambda name: sum(r.bytes for r in rows if r.phase == name)
  return phase("persistent") + max(phase("sampling"), phase("update"))


def format_table(rows: Sequence[Row], mesh: Mapping[str, int], accelerator: str = "cpu") -> str:
  """The plan as text: one line per component, the peak, and a WARNING when it exceeds the HBM."""
  lines = [f"{'component':<28}{'GiB/device':>11}  {'phase':<11}sharded over", "-" * 90]
  lines += [f"{r.component:<28}{r.gib:>11.2f}  {r.phase:<11}{r.sharding}" for r in rows]
  for phase in ("persistent", "sampling", "update"):
    lines.append(f"{'  subtotal ' + phase:<28}{sum(r.gib for r in rows if r.phase == phase):>11.2f}")
  total = peak_bytes(rows) / GIB
  lines.append(f"{'TOTAL (peak)':<28}{total:>11.2f}  persistent + max(sampling, update)")
  hbm = ACCELERATORS[accelerator]
  if hbm is not None:
    lines.append(f"{accelerator} HBM per device: {hbm} GiB")
    if total > hbm:
      lines.append(f"WARNING: {total:.2f} GiB per device exceeds the {hbm} GiB of a {accelerator} device "
                   f"(mesh data={mesh['data']}, fsdp={mesh['fsdp']}, tensor={mesh['tensor']}); use more fsdp "
                   f"(or tensor), a smaller train.batch_size or more optimizer.grad_accum_steps")
  return "\n".join(lines)


def report(config: Any, mesh_text: str = "", accelerator: str = "cpu", num_devices: int | None = None) -> str:
  """The CLI's output: a header line and the table. mesh_text ('data=1,fsdp=16,tensor=1') overrides the
  config's mesh."""
  if accelerator not in ACCELERATORS:
    raise ValueError(f"accelerator {accelerator!r} is not known; allowed: {', '.join(ACCELERATORS)}")
  mesh = resolve_mesh(parse_mesh(mesh_text) if mesh_text else dict(config.mesh), num_devices)
  rows = plan(config, mesh)
  cfg = model_config(config)
  header = (f"{config.model.preset}: {cfg.num_params() / 1e9:.3f}B params, batch {config.train.batch_size}, "
            f"prompt {max(config.data.prompt_buckets)} + {config.sampling.max_new_tokens} new tokens, "
            f"mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}")
  return header + "\n" + format_table(rows, mesh, accelerator)


def full_vs_lora(config: Any, mesh_text: str, accelerator: str, rank: int) -> str:
  """Side by side: the run of `config` with full params and with LoRA adapters of `rank` (the config's
  other lora settings; base_dtype defaults to the compute dtype), GiB per device."""
  if accelerator not in ACCELERATORS:
    raise ValueError(f"accelerator {accelerator!r} is not known; allowed: {', '.join(ACCELERATORS)}")
  mesh = resolve_mesh(parse_mesh(mesh_text) if mesh_text else dict(config.mesh))
  full, adapted = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  full.lora.rank = 0
  adapted.lora.rank = rank
  adapted.lora.base_dtype = adapted.lora.base_dtype or model_config(config).compute_dtype
  tables = [plan(c, mesh) for c in (full, adapted)]
  lines = [f"{'full':<28}{'GiB':>7}   {f'LoRA r={rank}':<28}{'GiB':>7}  phase", "-" * 86]
  for phase in ("persistent", "sampling", "update"):
    left, right = ([r for r in rows if r.phase == phase] for rows in tables)
    for i in range(max(len(left), len(right))):
      a = f"{left[i].component:<28}{left[i].gib:>7.2f}" if i < len(left) else " " * 35
      b = f"{right[i].component:<28}{right[i].gib:>7.2f}" if i < len(right) else " " * 35
      lines.append(f"{a}   {b}  {phase}")
  peaks = [peak_bytes(rows) / GIB for rows in tables]
  persistent = [sum(r.bytes for r in rows if r.phase == "persistent") / GIB for rows in tables]
  lines.append(f"{'params + optimizer':<28}{persistent[0]:>7.2f}   {'':<28}{persistent[1]:>7.2f}  "
               f"{persistent[0] / persistent[1]:.1f}x smaller")
  lines.append(f"{'TOTAL (peak)':<28}{peaks[0]:>7.2f}   {'':<28}{peaks[1]:>7.2f}  "
               f"{accelerator} HBM {ACCELERATORS[accelerator]} GiB")
  return "\n".join(lines)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  jax.config.update("jax_platforms", "cpu")  # shapes only: never claim the accelerators
  if _VS_LORA.value:
    print(full_vs_lora(_CONFIG.value, _MESH.value, _ACCELERATOR.value, _VS_LORA.value))
    return
  print(report(_CONFIG.value, _MESH.value, _ACCELERATOR.value, _DEVICES.value))  # bad input: cli.entry


if __name__ == "__main__":
  import jax
  from absl import app, flags
  from ml_collections import config_flags
  from bond_jax import cli
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dialogue.py:gemma_7b.")
  _MESH = flags.DEFINE_string("mesh", "", "data=..,fsdp=..,tensor=..; overrides the config's mesh.")
  _DEVICES = flags.DEFINE_integer("devices", None, "Device count, to resolve a -1 mesh axis.")
  _ACCELERATOR = flags.DEFINE_string("accelerator", "cpu", f"One of {', '.join(ACCELERATORS)}.")
  _VS_LORA = flags.DEFINE_integer("vs_lora", 0, "Print full params vs LoRA adapters of this rank.")
  flags.mark_flags_as_required(["config"])
  cli.entry(_main)
