"""`python -m bond_jax.export --workdir=runs/dialogue --out=hf_policy`: a run's model in Hugging Face format.

--which: policy (default; the latest J-BOND checkpoint), anchor, reference (the SFT stage) or reward (the
reward-model stage). The tokenizer of the run is written beside the weights.
"""

import os
import sys
import tempfile

from absl import app, flags

import flax.linen as nn
import jax

from bond_jax import checkpoint, hf, sharding
from bond_jax import workdir as workdir_lib
from bond_jax.data.tokenizer import load_tokenizer
from bond_jax.models import transformer

_WORKDIR = flags.DEFINE_string("workdir", None, "A bond_jax run directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must be empty unless --overwrite).")
_WHICH = flags.DEFINE_enum("which", "policy", ["policy", "anchor", "reference", "reward"], "Which model.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Tensor dtype (default: params').")
flags.mark_flags_as_required(["workdir", "out"])


def load_run_params(workdir: str, which: str):
  """(params on one device, ModelConfig) of a run's policy, anchor (latest J-BOND checkpoint), reference
  (SFT stage) or reward model."""
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  if which in ("reference", "reward"):
    return workdir_lib.load_stage_params(workdir, "lm" if which == "reference" else "reward", mesh)
  if which not in ("policy", "anchor"):
    raise ValueError(f"which={which!r}; allowed: policy, anchor, reference, reward")
  directory = workdir_lib.checkpoint_dir(workdir, "bond")
  if not os.path.isdir(directory):
    raise ValueError(f"{workdir!r} has no J-BOND checkpoint ({directory} is missing); train first or "
                     "export --which=reference")
  meta, step = checkpoint.read_meta(directory)
  cfg = workdir_lib.model_config_from_dict(meta["model"])
  abstract = jax.eval_shape(lambda r: transformer.init_boxed(cfg, r), jax.random.key(0))
  shardings = sharding.tree_shardings(sharding.logical_specs(abstract), mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract),
                        shardings)
  key = "params" if which == "policy" else "anchor_params"
  return checkpoint.restore_item(directory, step, key, target), cfg


def export_run(workdir: str, out: str, which: str = "policy", overwrite: bool = False,
               dtype: str | None = None) -> str:
  """Export one model of a run; returns the output directory."""
  params, cfg = load_run_params(workdir, which)
  tok = load_tokenizer(workdir_lib.tokenizer_path(workdir))
  with tempfile.TemporaryDirectory() as tmp:
    tok.save_hf_tokenizer_files(tmp)
    files = {name: os.path.join(tmp, name) for name in os.listdir(tmp)}
    hf.export(params, cfg, out, kind="reward" if which == "reward" else "lm", overwrite=overwrite,
              tokenizer_files=files, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype=dtype)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    out = export_run(_WORKDIR.value, _OUT.value, _WHICH.value, _OVERWRITE.value, _DTYPE.value)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"exported {_WHICH.value} of {_WORKDIR.value} to {out}")


if __name__ == "__main__":
  app.run(main)
