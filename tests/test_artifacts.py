"""Loading the params a stage produced, from a workdir, a stage directory or a Hugging Face directory."""

import jax
import numpy as np
import optax
import pytest

from bond_jax import artifacts, checkpoint, hf, sharding, update, workdir as wd
from bond_jax.models import params as params_lib
from bond_jax.models import presets


def _save_stage(workdir, kind, params, cfg):
  optimizer = optax.adam(1e-3)
  mesh = sharding.make_mesh({"fsdp": -1})
  state = update.new_state(params, optimizer, mesh)
  mngr = checkpoint.manager(wd.checkpoint_dir(workdir, wd.KINDS[kind]))
  checkpoint.save(mngr, 7, state, dict(kind=kind, model=cfg.to_dict(), final_metrics=None), force=True)
  mngr.wait_until_finished()
  mngr.close()


@pytest.mark.parametrize("kind", ["lm", "reward"])
def test_load_from_orbax_and_hugging_face(tmp_path, kind, tiny_config):
  mesh = sharding.make_mesh({"fsdp": -1})
  cfg = presets.from_config(tiny_config().model, 128)
  params = params_lib.init_sharded(cfg, kind, jax.random.key(0), mesh)
  if kind == "reward":  # a non-zero head, so the comparison covers it
    params = {**params, "head": params["head"] + 0.5}
  workdir = str(tmp_path / "run")
  _save_stage(workdir, kind, params, cfg)
  hf_dir = str(tmp_path / "hf")
  hf.export(params, cfg, hf_dir, kind=kind, bos_id=2, eos_id=1, pad_id=0)
  for source in (workdir, wd.stage_dir(workdir, wd.KINDS[kind]), hf_dir):
    loaded, loaded_cfg = artifacts.load(source, kind, mesh)
    assert (loaded_cfg.d_model, loaded_cfg.vocab_size) == (cfg.d_model, cfg.vocab_size)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))
    embedding = loaded["embedding"] if kind == "lm" else loaded["backbone"]["embedding"]
    assert embedding.sharding.spec == sharding.logical_to_spec(("vocab", "embed"))
  other = "reward" if kind == "lm" else "lm"
  with pytest.raises(ValueError, match=f"holds no {wd.KINDS[other]!r} checkpoint"):
    artifacts.load(workdir, other, mesh)
