"""LoRA export: merged weights as the family's *ForCausalLM (the function the sampler ran, bit for bit) and a
PEFT adapter directory that peft.PeftModel.from_pretrained loads onto the exported base."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from bond_jax import artifacts, hf, hf_peft, sampling, sharding
from bond_jax.models import lora, params as params_lib, transformer
from bond_jax.models.config import ModelConfig

TINY = dict(vocab_size=128, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
            max_seq_len=128)
FAMILIES = {
    "llama": dict(TINY, family="llama", tie_embeddings=False),
    "qwen3_scanned": dict(TINY, family="qwen3", qk_norm=True, head_dim=24, scan_layers=True),
}
# rslora and a layer subset on one family, every projection on the other
SETTINGS = {
    "llama": lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"), layers=(0, 2), rslora=True),
    "qwen3_scanned": lora.LoraConfig(rank=8, alpha=16.0),
}


def _torch_logits(model, tokens, mask):
  positions = np.asarray(transformer.positions_from_mask(mask))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens,
                                       dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_merged_and_peft_exports_give_the_unmerged_models_logits(name, tmp_path):
  cfg, settings = ModelConfig(**FAMILIES[name]), SETTINGS[name]
  base = nn.unbox(jax.jit(lambda r: params_lib.init_boxed(cfg, "lm", r))(jax.random.key(0)))
  adapters = lora.init(cfg, settings, base, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape), adapters)
  attached = lora.attach(base, adapters, settings)
  merged = artifacts.merged(base, adapters, settings)
  for what, params in (("base", base), ("merged", merged)):
    hf.export(params, cfg, str(tmp_path / what), pad_id=0)
  hf_peft.export_adapters(adapters, cfg, settings, str(tmp_path / "peft"), base_path=str(tmp_path / "base"))
  assert sorted(os.listdir(tmp_path / "peft")) == [hf_peft.CONFIG, hf_peft.WEIGHTS]

  rng = np.random.default_rng(0)
  mask = np.arange(12)[None] >= np.array([[0], [5], [9]])
  tokens = np.where(mask, rng.integers(1, cfg.vocab_size, mask.shape), 0).astype(np.int32)
  ours = np.asarray(transformer.forward(cfg, attached, tokens, mask))
  assert np.abs(ours - np.asarray(transformer.forward(cfg, base, tokens, mask)))[mask].max() > 0.1
  load = lambda what: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / what).float().eval()
  with_adapter = peft.PeftModel.from_pretrained(load("base"), str(tmp_path / "peft")).eval()
  theirs_merged, theirs_peft = _torch_logits(load("merged"), tokens,
                                             mask), _torch_logits(with_adapter, tokens, mask)
  assert np.abs(theirs_merged - theirs_peft)[mask].max() <= 1e-5  # merged = unmerged, in transformers
  assert np.abs(theirs_peft - ours)[mask].max() <= 1e-4  # PEFT's LoRA = ours
  assert np.abs(np.asarray(transformer.forward(cfg, merged, tokens, mask)) - ours)[mask].max() <= 1e-5
  config = json.loads((tmp_path / "peft" / hf_peft.CONFIG).read_text())
  assert config["r"] == settings.rank and config["use_rslora"] == settings.rslora

  # the merged export is the function the sampler ran: imported back, it draws the same samples bitwise
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  imported, _ = hf.import_params(str(tmp_path / "merged"), mesh=mesh, scan_layers=cfg.scan_layers)
  draw = lambda params: sampling.generate(cfg, params, tokens, mask, jax.random.key(7), num_samples=2,
                                          max_new_tokens=10, mesh=mesh)
  a, b = draw(attached), draw(imported)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.model_logprobs, b.model_logprobs)
