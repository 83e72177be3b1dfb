"""`python -m bond_jax.export --workdir=runs/dialogue --out=hf_policy`: a run's model in Hugging Face format.

--which: policy (default; the latest J-BOND checkpoint), anchor, reference (the SFT stage) or reward (the
reward-model stage). The tokenizer of the run is written beside the weights (the trained SentencePiece
model as transformers reads it, or the given tokenizer directory's own files). A LoRA run exports its base
with the adapters merged (the function its sampler ran), or with --peft the adapters alone as a PEFT adapter
directory (bond_jax/hf_peft.py). Every file gets the mode
open() gives (0644 under a 022 umask).

Before anything loads, the paths are checked (one-line errors, exit 2): the workdir must hold a
checkpoint of the model asked for, and --out may not be, contain or lie inside the workdir (with
--overwrite that would delete the run); --overwrite replaces only an earlier export.
"""

import os
import tempfile

from absl import app, flags
import jax

from bond_jax import artifacts, checkpoint, cli, hf, hf_peft, sharding
from bond_jax import workdir as workdir_lib
from bond_jax.data import hf_tokenizer
from bond_jax.models.config import ModelConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "A bond_jax run directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must be empty unless --overwrite).")
_WHICH = flags.DEFINE_enum("which", "policy", list(artifacts.WHICH), "Which model.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an earlier export in --out.")
_PEFT = flags.DEFINE_bool(
    "peft", False, "A LoRA run's policy or anchor as a PEFT adapter directory (adapter_config.json + "
    "adapter_model.safetensors, for peft.PeftModel.from_pretrained on its base) instead of merged weights.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Tensor dtype (default: params').")
flags.mark_flags_as_required(["workdir", "out"])

# which -> (the stage whose checkpoints hold it, what to do when there are none); "bond" is the
# distillation stage artifacts.load_run_model reads.
_STAGES = {
    "policy": ("bond", "train first, or export --which=reference"),
    "anchor": ("bond", "train first, or export --which=reference"),
    "reference":
        (workdir_lib.KINDS["lm"], "its SFT stage has not run (a run given config.reference has none)"),
    "reward": (workdir_lib.KINDS["reward"],
               "its reward-model stage has not run (a run given config.reward_model has none)"),
}


def check_workdir(workdir: str, which: str) -> None:
  """cli.UserError unless `workdir` holds a checkpoint of `which` and the run's tokenizer."""
  if not os.path.isdir(workdir):
    problem = "is not a directory" if os.path.exists(workdir) else "does not exist"
    raise cli.UserError(f"--workdir {workdir} {problem}")
  if which not in _STAGES:
    raise cli.UserError(f"which={which!r}; allowed: {', '.join(_STAGES)}")
  stage, hint = _STAGES[which]
  if which == "reward" and os.path.exists(workdir_lib.bag_of_words_path(workdir)):
    raise cli.UserError(f"workdir {workdir}'s reward model is the bag-of-words model in "
                        f"{workdir_lib.bag_of_words_path(workdir)} (reward_training.model='bag_of_words'), "
                        "which has no Hugging Face form: use that JSON file (words and weights) as it is")
  directory = workdir_lib.checkpoint_dir(workdir, stage)
  if not (os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))):
    raise cli.UserError(f"workdir {workdir} has no {which} checkpoint (none in {directory}); {hint}")
  tokenizer = workdir_lib.tokenizer_dir(workdir)
  if not hf_tokenizer.has_tokenizer(tokenizer):
    raise cli.UserError(f"workdir {workdir} has no tokenizer ({tokenizer} holds no tokenizer.model or "
                        "tokenizer.json)")


def check_out(workdir: str, out: str, overwrite: bool) -> None:
  """cli.UserError for an --out that would overwrite the run, something other than an earlier export,
  or a directory that cannot be written."""
  run, target = os.path.realpath(workdir), os.path.realpath(out)
  common = os.path.commonpath([run, target])
  relation = {run: "lies inside", target: "contains"}.get(common) if target != run else "is"
  if relation:
    raise cli.UserError(f"--out {out} {relation} the run directory --workdir={workdir}; writing there would "
                        "replace or mix with the run: export to a directory outside it")
  hf.check_out_dir(out, overwrite)
  if os.path.isdir(out) and os.listdir(out) and not artifacts.is_hf_dir(out):
    raise cli.UserError(f"--overwrite replaces only an earlier export, and {out} is not one (no config.json "
                        "and *.safetensors); give an empty or new --out")
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise cli.UserError(f"--out {out}: {parent} is not writable (permission denied)")


def load_run_params(workdir: str, which: str):
  """(params on one device, ModelConfig) of a run's policy, anchor (latest J-BOND checkpoint), reference
  (SFT stage) or reward model."""
  return artifacts.load_run_model(workdir, which, sharding.make_mesh({}, jax.devices()[:1]))


def export_adapters(workdir: str, out: str, which: str = "policy", overwrite: bool = False) -> str:
  """A LoRA run's policy or anchor adapters as a PEFT adapter directory; returns it."""
  if which not in ("policy", "anchor"):
    raise cli.UserError(f"--peft exports a LoRA run's policy or anchor adapters, not --which={which}")
  check_workdir(workdir, which)
  hf.check_out_dir(out, overwrite)
  directory = workdir_lib.checkpoint_dir(workdir, _STAGES[which][0])
  meta, step = checkpoint.read_meta(directory)
  if meta.get("base") is None:
    raise cli.UserError(f"--peft: {directory} step {step} holds full params, not LoRA adapters (trained "
                        "with lora.rank=0); export the merged model without --peft")
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  adapters, _, lora = artifacts.load_adapters(directory, step,
                                              "params" if which == "policy" else "anchor_params", meta, mesh)
  hf_peft.export_adapters(adapters, ModelConfig.from_dict(meta["model"]), lora, out,
                          base_path=meta["base"]["path"], overwrite=overwrite)
  return out


def export_run(workdir: str, out: str, which: str = "policy", overwrite: bool = False,
               dtype: str | None = None) -> str:
  """Export one model of a run (a LoRA run's merged: base + adapters); returns the output directory."""
  check_workdir(workdir, which)
  check_out(workdir, out, overwrite)
  params, cfg = load_run_params(workdir, which)
  tok = hf_tokenizer.load(workdir_lib.tokenizer_dir(workdir))
  with tempfile.TemporaryDirectory() as tmp:
    if "tokenizer_config.json" in tok.files:  # a given tokenizer directory: its own files
      for name, data in tok.files.items():
        with open(os.path.join(tmp, name), "wb") as f:
          f.write(data)
    else:  # trained here: the files transformers reads it from
      tok.save_hf_tokenizer_files(tmp)
    files = {name: os.path.join(tmp, name) for name in os.listdir(tmp)}
    hf.export(params, cfg, out, kind="reward" if which == "reward" else "lm", overwrite=overwrite,
              tokenizer_files=files, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype=dtype)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _PEFT.value:
    out = export_adapters(_WORKDIR.value, _OUT.value, _WHICH.value, _OVERWRITE.value)
  else:
    out = export_run(_WORKDIR.value, _OUT.value, _WHICH.value, _OVERWRITE.value, _DTYPE.value)
  print(f"exported {_WHICH.value} of {_WORKDIR.value} to {out}")


if __name__ == "__main__":
  cli.entry(main)
