"""Hugging Face interop: import parity, export parity (logits and greedy text), bit-exact round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bond_jax import hf, sharding
from bond_jax.models import reward, transformer
from bond_jax.models.config import ModelConfig

TINY = dict(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
            max_seq_len=128)
PAD, BOS, EOS = 0, 2, 1
LLAMA_FORM = dict(**TINY, family="llama", tie_embeddings=False, rope_theta=500_000.0)
LLAMA_FORM_SCALED = dict(LLAMA_FORM, rope_llama3_scaling=(8.0, 1.0, 4.0, 32))
GEMMA_FORM = dict(**TINY, family="gemma", tie_embeddings=True)
# Each family's features switched on at sizes where they bite: windows (5) shorter than the 12-token batch
# and the 32-token greedy continuation, soft caps near the scores' and logits' scale, head_dim 24 != 64 / 4.
QWEN2_FORM = dict(**TINY, family="qwen2", qkv_bias=True, tie_embeddings=False, rope_theta=1e6)
QWEN3_FORM = dict(TINY, family="qwen3", qk_norm=True, head_dim=24, tie_embeddings=True, rope_theta=1e6)
MISTRAL_FORM = dict(**TINY, family="mistral", sliding_window=5, tie_embeddings=False)
GEMMA2_FORM = dict(TINY, family="gemma2", head_dim=24, sliding_window=5, query_pre_attn_scalar=16.0,
                   layer_types=("sliding_attention", "full_attention"), attn_softcap=1.0, final_softcap=3.0)
GEMMA3_FORM = dict(TINY, family="gemma3", num_layers=3, qk_norm=True, sliding_window=5,
                   query_pre_attn_scalar=16.0,
                   layer_types=("sliding_attention", "sliding_attention", "full_attention"), rope_theta=1e6,
                   rope_local_theta=1e4, rope_linear_factor=8.0)
FAMILIES = {
    "llama": LLAMA_FORM,
    "llama3_rope": LLAMA_FORM_SCALED,
    "gemma": GEMMA_FORM,
    "qwen2": QWEN2_FORM,
    "qwen3": QWEN3_FORM,
    "mistral": MISTRAL_FORM,
    "gemma2": GEMMA2_FORM,
    "gemma3": GEMMA3_FORM
}
NEW = ["qwen2", "qwen3", "mistral", "gemma2", "gemma3"]


def _batch(seed=0, lengths=(12, 7, 3), length=12):
  """Left-padded random tokens [B, T] (never the pad id) and their mask."""
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths)
  mask = np.arange(length)[None] >= (length - lengths)[:, None]
  tokens = np.where(mask, rng.integers(3, TINY["vocab_size"], (len(lengths), length)), PAD)
  return tokens.astype(np.int32), mask


def _torch_logits(model, tokens, mask):
  """Logits of a transformers model with the same left-padding positions as ours."""
  positions = np.asarray(transformer.positions_from_mask(jnp.asarray(mask)))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens,
                                       dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def _random_hf_model(name, kind, tmp_path):
  """A tiny random transformers model of the family, saved to disk (made locally, nothing downloaded)."""
  torch.manual_seed(0)
  cfg = ModelConfig(**FAMILIES[name])
  hf_cfg = hf.config_to_hf(cfg, kind, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
  cls = transformers.AutoModelForCausalLM if kind == "lm" else transformers.AutoModelForSequenceClassification
  model = cls.from_config(config).float().eval()
  with torch.no_grad():  # the default init leaves norms at 1 / 0: perturb them so the test sees them
    for pname, p in model.named_parameters():
      if "norm" in pname or "score" in pname or "bias" in pname:
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(tmp_path / name)
  return model, tmp_path / name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_matches_transformers_logits(name, tmp_path):
  model, path = _random_hf_model(name, "lm", tmp_path)
  params, cfg = hf.import_params(str(path), mesh=sharding.make_mesh({"fsdp": 4, "tensor": 2}))
  assert cfg.family == FAMILIES[name]["family"]
  tokens, mask = _batch()
  ours = np.asarray(jax.jit(transformer.forward, static_argnums=0)(cfg, params, tokens, mask))
  theirs = _torch_logits(model, tokens, mask)
  diff = np.abs(ours - theirs)[mask].max()
  assert diff <= 1e-4, diff
  assert np.abs(theirs[mask]).max() > 0.1  # the comparison is not between two zero tensors


def _our_model(name, seed=1, **overrides):
  cfg = ModelConfig(**{**FAMILIES[name], **overrides})
  params, _ = sharding.init_sharded(lambda r: transformer.init_boxed(cfg, r), jax.random.key(seed),
                                    sharding.make_mesh({"data": 1},
                                                       jax.devices()[:1]))
  # norms start at their identity values: perturb them so an export bug there cannot hide
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.2 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
      if "norm" in jax.tree_util.keystr(p) or "bias" in jax.tree_util.keystr(p) else x, params)
  return cfg, params


@pytest.mark.parametrize("name", ["llama", "gemma", *NEW])
def test_export_loads_in_transformers_with_same_logits_and_greedy_text(name, tmp_path):
  cfg, params = _our_model(name)
  out = tmp_path / "export"
  hf.export(params, cfg, str(out), bos_id=BOS, eos_id=EOS, pad_id=PAD)
  assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(out))
  model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  assert type(model).__name__ == hf.config_to_hf(cfg)["architectures"][0]
  tokens, mask = _batch(seed=3)
  theirs = _torch_logits(model, tokens, mask)
  ours = np.asarray(transformer.forward(cfg, params, tokens, mask))
  assert np.abs(ours - theirs)[mask].max() <= 1e-4

  # greedy continuation of 32 tokens of one prompt: ours through the KV cache, theirs via generate
  prompt = tokens[:1]
  with torch.no_grad():
    generated = model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32, do_sample=False,
                               min_new_tokens=32, eos_token_id=None, pad_token_id=PAD)
  theirs_greedy = generated[0, prompt.shape[1]:].numpy()
  logits, cache = transformer.prefill(cfg, params, prompt, np.ones_like(prompt, bool), 64)
  token = jnp.argmax(logits[:, -1], -1)
  ours_greedy = [int(token[0])]
  step = jax.jit(transformer.decode_step, static_argnums=0)
  for _ in range(31):
    logits, cache = step(cfg, params, token, cache)
    token = jnp.argmax(logits, -1)
    ours_greedy.append(int(token[0]))
  np.testing.assert_array_equal(np.asarray(ours_greedy), theirs_greedy)


@pytest.mark.parametrize("name,scan", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True),
                                       ("mistral", False), ("gemma2", True), ("gemma3", True),
                                       ("gemma3", False)])
def test_export_import_round_trip_is_bit_exact(name, scan, tmp_path):
  cfg, params = _our_model(name, scan_layers=scan)
  hf.export(params, cfg, str(tmp_path / "rt"), bos_id=BOS, eos_id=EOS, pad_id=PAD,
            max_shard_bytes=60_000)  # small shards: exercises the sharded index too
  assert (tmp_path / "rt" / "model.safetensors.index.json").exists()
  back, cfg_back = hf.import_params(str(tmp_path / "rt"), scan_layers=scan)
  assert cfg_back == cfg
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["llama", "gemma", *NEW])
def test_reward_model_import_export_parity(name, tmp_path):
  model, path = _random_hf_model(name, "reward", tmp_path)
  params, cfg = hf.import_params(str(path))
  tokens, mask = _batch(seed=5)
  with torch.no_grad():  # left padding: transformers reads the last non-pad token, as we do
    positions = np.asarray(transformer.positions_from_mask(jnp.asarray(mask)))
    theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask.astype(np.int64)),
                   position_ids=torch.tensor(positions, dtype=torch.long)).logits[:, 0].numpy()
  ours = np.asarray(reward.score(cfg, params, tokens, mask))
  assert np.abs(ours - theirs).max() <= 1e-4 and np.abs(theirs).max() > 1e-3

  hf.export(params, cfg, str(tmp_path / "rm"), kind="reward", bos_id=BOS, eos_id=EOS, pad_id=PAD)
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
  assert json.loads((tmp_path / "rm" / "config.json").read_text())["pad_token_id"] == PAD
  with torch.no_grad():  # right-padded batch, transformers' own default positions
    right_tokens = np.where(mask[:, ::-1], tokens[:, ::-1], PAD)  # reversed rows stand in for content
    right_mask = mask[:, ::-1].copy()
    scores = reloaded(input_ids=torch.tensor(right_tokens, dtype=torch.long),
                      attention_mask=torch.tensor(right_mask.astype(np.int64))).logits[:, 0].numpy()
  left_tokens = np.zeros_like(right_tokens)
  for i, row in enumerate(right_tokens):  # the same rows, left-padded for us
    real = row[right_mask[i]]
    left_tokens[i, len(row) - len(real):] = real
  ours = np.asarray(reward.score(cfg, params, left_tokens, mask))
  assert np.abs(ours - scores).max() <= 1e-4
  back, _ = hf.import_params(str(tmp_path / "rm"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_refuses_non_empty_directory_without_overwrite(tmp_path):
  cfg, params = _our_model("gemma")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "keep.txt").write_text("precious")
  with pytest.raises(ValueError, match=r"not empty; pass --overwrite"):
    hf.export(params, cfg, str(tmp_path / "busy"))
  assert (tmp_path / "busy" / "keep.txt").read_text() == "precious"
  hf.export(params, cfg, str(tmp_path / "busy"), overwrite=True)
  assert not (tmp_path / "busy" / "keep.txt").exists()


def test_import_rejects_unsupported_architecture(tmp_path):
  (tmp_path / "gpt2").mkdir()
  (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
  with pytest.raises(
      ValueError, match=r"model_type 'gpt2' is not supported; allowed: llama, gemma, qwen2, "
      r"qwen3, mistral, gemma2, gemma3_text$"):
    hf.import_params(str(tmp_path / "gpt2"))


def _edited_export(tmp_path, name, **changes):
  """An export of our `name` model whose config.json then gets `changes` (None: the field removed)."""
  cfg, params = _our_model(name)
  hf.export(params, cfg, str(tmp_path / name))
  path = tmp_path / name / "config.json"
  fields = json.loads(path.read_text())
  fields.update(changes)
  path.write_text(json.dumps({k: v for k, v in fields.items() if v is not None}))
  return tmp_path / name


def test_import_rejects_a_config_lacking_a_field_the_family_needs(tmp_path):
  path = _edited_export(tmp_path, "gemma2", query_pre_attn_scalar=None)
  with pytest.raises(ValueError,
                     match=r"config.json: a gemma2 config needs query_pre_attn_scalar; the file lacks"):
    hf.import_params(str(path))


def test_import_rejects_tensors_whose_shapes_do_not_match_the_config(tmp_path):
  path = _edited_export(tmp_path, "qwen3", head_dim=16)
  with pytest.raises(
      ValueError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' has shape \(96, 64\); "
      r"expected \(64, 64\) from config.json"):
    hf.import_params(str(path))


def test_import_rejects_tensors_the_config_has_no_place_for(tmp_path):
  path = _edited_export(tmp_path, "qwen3", model_type="llama", architectures=["LlamaForCausalLM"])
  with pytest.raises(
      ValueError, match=r"tensor 'model.layers.0.self_attn.k_norm.weight' \(and 3 more\) has no "
      r"place in a llama model"):
    hf.import_params(str(path))


OLD_LAYOUTS = {  # config.json fields as older transformers versions wrote them
    "gemma3": dict(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                   sliding_window_pattern=3, sliding_window=5, query_pre_attn_scalar=16, head_dim=16),
    "gemma2": dict(rope_theta=1e4, sliding_window=5, query_pre_attn_scalar=16, head_dim=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "llama": dict(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("model_type", list(OLD_LAYOUTS))
def test_old_and_transformers_5_rope_layouts_read_alike(model_type):
  """The old layout (rope_theta, rope_scaling, rope_local_base_freq, no layer_types) and the one
  transformers 5 itself converts it to give the same ModelConfig."""
  old = dict(model_type=model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256,
             **OLD_LAYOUTS[model_type])
  if model_type != "llama":
    old.update(hidden_act="gelu_pytorch_tanh",
               model_type=f"{model_type}_text" if model_type == "gemma3" else model_type)
  new = transformers.AutoConfig.for_model(**old).to_dict()
  assert "rope_parameters" in new and "rope_scaling" not in new
  ours = hf.config_from_hf(old)
  assert ours == hf.config_from_hf(new)
  if model_type == "gemma3":
    assert (ours.rope_theta, ours.rope_local_theta, ours.rope_linear_factor) == (1e6, 1e4, 8.0)
    assert ours.sliding_layers == (True, True, False) * 2
  if model_type == "gemma2":
    assert ours.sliding_layers == (True, False) * 3


@pytest.mark.parametrize("change,message", [
    (dict(family="llama", sliding_window=4), "sliding_window=4 has no llama config.json field"),
    (dict(family="qwen3", qk_norm=False), "qwen3 models have qk_norm=True"),
])
def test_export_refuses_a_feature_its_family_cannot_express(change, message, tmp_path):
  cfg, params = _our_model("llama")
  with pytest.raises(ValueError, match=message):
    hf.export(params, cfg.replace(**change), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
