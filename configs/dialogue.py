"""J-BOND on chitchat dialogues rated by people (the embedded default: tiny models, 2-core CPU).

Presets: `--config=configs/dialogue.py` (tiny, CPU), `...:smoke` (a 1-2 minute check of the whole pipeline),
`...:small`, `...:gemma_2b`, `...:gemma_7b` (TPU pods:
start from a Hugging Face checkpoint with --config.reference=... and --config.reward_model=...).
Override any field: `--config.bond.eta=0.05 --config.train.steps=500`.
"""

import ml_collections


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model shape (bond_jax/models/presets.py); vocab_size comes from the tokenizer when it is trained here.
  c.model = ml_collections.ConfigDict(dict(preset="tiny", overrides=ml_collections.ConfigDict()))
  # Mesh: ('data', 'fsdp', 'tensor'); -1 takes the devices left over.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  # Where pi_ref and r come from: '' = train them here (SFT, then a Bradley-Terry reward model, cached in
  # the workdir), or a Hugging Face directory, or an Orbax workdir of a previous SFT / reward stage.
  c.reference = ""
  c.reward_model = ""

  c.data = ml_collections.ConfigDict(
      dict(
          task="chitchat",  # chitchat | summarization
          tokenizer="",  # a SentencePiece .model; '' = train a BPE one on the training split
          vocab_size=2048,  # for a tokenizer trained here
          context_turns=3,  # dialogue turns shown in an SFT prompt
          # Turns in a response: what SFT teaches the policy to write before EOS, what the reward model scores
          # and what J-BOND samples. A conversation's "interesting" rating is about the whole exchange: one
          # opening turn carries almost none of it (held-out pairs at chance); two turns carry enough for a
          # reward model at ~67% held-out accuracy (README, "Results"); three add little for 50% more tokens.
          response_turns=2,
          # Opening turns of a conversation shown in a distillation prompt ("Topic: ...\nA: hi\nB:"): one
          # prompt per conversation, ~3,000 distinct training prompts instead of 28 starter topics. The reward
          # model is trained on prompt_turns + response_turns turns, the transcript it scores. 0 = topic only.
          prompt_turns=1,
          # Prompt widths (tokens) a batch is padded to; a longer prompt is left-truncated to the widest
          # (the longest topic has 65). One width: one compilation of the J-BOND step.
          prompt_buckets=(64,),  # prompts longer than the widest are dropped (89% of openings fit 64)
          max_conversations=0,  # 0 = all 7,168; smaller for quick runs
      ))

  # SFT / reward stages (bond_jax/sft.py, bond_jax/reward_training.py). Sized for the 2-core CPU default:
  # with data and tokenizer ~9 min in all, SFT ~5.5 of it (README "Results (embedded dialogue task)").
  # Each stage section has the same schedule keys (steps, log_every, eval_every, checkpoint_every,
  # keep_checkpoints, max_bad_steps: bond_jax/loop.py) and, for SFT and the reward model, the same
  # optimizer keys as `optimizer` below (Adam, warm-up then cosine decay to end_lr_fraction, clipping).
  stage_optimizer = dict(schedule="cosine", end_lr_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                         clip_norm=1.0, grad_accum_steps=1)
  c.sft = ml_collections.ConfigDict(
      dict(steps=300, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=30, eval_every=100,
           eval_batches=20, checkpoint_every=100, log_every=20, keep_checkpoints=2, max_bad_steps=5,
           **stage_optimizer))
  c.reward_training = ml_collections.ConfigDict(
      dict(steps=150, batch_size=16, max_len=80, buckets=(48, 80), learning_rate=2e-3, warmup_steps=20,
           rating="interesting", margin=2.0, max_pairs_per_prompt=200, eval_every=150, checkpoint_every=150,
           log_every=25, keep_checkpoints=2, max_bad_steps=5, **stage_optimizer))
  # The reward model: 'bag_of_words' (Bradley-Terry on the word presence of the conversation's turns,
  # fitted in seconds on the same pairs, scored on the host; the steps / optimizer keys above are then
  # unused) or 'transformer' (the Bradley-Terry network above, from the SFT backbone). Measured on this task
  # (docs/results.md): bag of words is the more accurate model of the ratings on held-out pairs (0.717
  # against 0.678 in distribution).
  c.reward_training.model = "bag_of_words"

  # The distribution-matching stage (docs/math.md).
  c.bond = ml_collections.ConfigDict(
      dict(
          algorithm="jbond",  # jbond | jbond_hard | bond | iterative_bond | reinforce (bond_jax/algorithms.py)
          n=2,  # Best-of-n per anchor (J-BOND uses 2); BOND: N
          beta=0.5,  # Jeffreys mix: (1 - beta) forward KL + beta backward KL
          # EMA anchor rate (J-BOND). After T steps J-BOND aims at ~Best-of-2^(eta T) of pi_ref; the policy
          # lags that target: 0.025 x 100 steps aims at Best-of-5.7. Measured, bag-of-words reward, 48
          # prompts, 100 steps (docs/results.md): eta 0.02: quantile 0.674 at KL 0.561; eta 0.025: 0.699 at
          # KL 0.703 (0.733 per position, half of it on where to stop: the policy buys quantile with
          # length), within 1.5 x Best-of-4's KL (0.95). The network reward's study front (16 prompts):
          # eta 0.01 gamma 1: 0.562 at KL 0.131; eta 0.02 gamma 0: 0.677 at KL 0.725; eta 0.05 gamma 0:
          # 0.696 at KL 0.867.
          eta=0.025,
          # Extra KL-to-anchor weight (J-BOND), >= 0. Measured under the bag-of-words reward's earlier
          # scoring (the response alone, docs/results.md): at 16 prompts a step gamma 1 bought quantile per
          # nat; at 48 it lay on the gamma-0 curve, so 0 is the default.
          gamma=0.0,
          k=16,  # reference samples per prompt for Monte-Carlo quantiles (BOND)
          # BOND's forward-KL term: 'best_of_n' (NLL of the best of the first n of the k samples, eq. 13) or
          # 'all_k' (all k, each weighted by its chance to be a Best-of-n, less its importance weight under
          # the policy: the same expected gradient, whose noise vanishes as the policy reaches Best-of-n)
          forward_estimator="best_of_n",
          # The KL term of every algorithm's return (BOND's to pi_ref, J-BOND's to the anchor and its gamma
          # term, RLOO's to pi_ref): 'sampled' (the log-ratio log pi(y) - log pi_base(y), eq. 15) or
          # 'per_position' (the exact KL of each position's next-token law along the sample: the same
          # expected gradient, 5x less noise; docs/math.md). Measured on this task (docs/results.md, "The KL
          # term at each position"): the same quantile per nat as 'sampled', ~10% slower.
          kl_estimator="sampled",
          # BOND: where each step's k samples of pi_ref are kept, keyed by what they depend on (as
          # eval.pool_dir): '' = drawn every step, never kept; the study's BOND arms share one
          pool_dir="",
          anchor_period=100,  # hard anchor update every this many steps (iterative BOND)
          beta_rl=0.05,  # KL weight of the REINFORCE baseline
      ))
  # LoRA for the distillation stage (bond_jax/models/lora.py): rank 0 = off (the policy trains whole).
  # On, the policy and the anchor are adapters on one frozen base (pi_ref): optimizer state and EMA cover
  # the adapters only. alpha / rank scales the product; targets among q k v o gate up down; layers: the
  # adapted layer indices (() = all); base_dtype: '' (as loaded) or bfloat16 / float32; decode: merge
  # (adapters folded into the sampler's weights once per call) or low_rank (applied every step).
  c.lora = ml_collections.ConfigDict(
      dict(rank=0, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down"), layers=(), rslora=False,
           base_dtype="", decode="merge"))
  # 48 tokens hold 75% of two-turn responses whole (median 26); a longer one is cut and scored as cut.
  c.sampling = ml_collections.ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=48))
  c.optimizer = ml_collections.ConfigDict(
      dict(
          # 5e-5: at 2e-4 the policy spent ~2x more KL for the same quantile (README, "Results")
          learning_rate=5e-5,
          warmup_steps=20,
          schedule="constant",
          end_lr_fraction=0.0,
          b1=0.9,
          b2=0.99,
          # Adam's denominator floor. Far above the gradients' scale Adam turns into momentum SGD: a
          # coordinate whose gradient is small (mostly noise) then moves in proportion to it instead of at
          # the learning rate. Measured (docs/results.md, "The optimizer's step"): J-BOND at 5e-4 and 2e-3
          # (learning rate 1e-4 / 2e-4) reached the default's quantile for ~0.1 more nats of KL.
          eps=1e-8,
          weight_decay=0.0,
          clip_norm=1.0,
          grad_accum_steps=1))
  # 48 prompts a step: the same quantile for less KL than 16 (the policy gradient's noise costs KL that
  # buys no reward), and 64 were no better than 48: measured under the bag-of-words reward's earlier
  # scoring (docs/results.md).
  c.train = ml_collections.ConfigDict(
      dict(steps=100, batch_size=48, log_every=10, eval_every=50, checkpoint_every=50, keep_checkpoints=3,
           max_bad_steps=5))
  # Every eval_every steps, on each held-out prompt set (chitchat: in-distribution conversations, then the
  # held-out topics' ones), num_prompts prompts spread over the set: policy_samples samples of the policy per
  # prompt, each ranked among quantile_samples samples of pi_ref of the same prompt (drawn and scored once per
  # run: pi_ref is frozen). 512 policy samples per set: quantile SE ~0.01, KS noise ~0.04.
  c.eval = ml_collections.ConfigDict(
      dict(
          num_prompts=64,
          best_of=(1, 2, 4, 8, 16),
          quantile_samples=32,
          policy_samples=8,
          # also KL(pi_BoN || pi) and KL(pi || pi_BoN) at the tracked N (scores the pool under the policy)
          best_of_n_kl=False,
          # where pi_ref's pools are kept, keyed by what they depend on (models' contents, prompts, seed, K):
          # '' = <workdir>/bond/eval/pools (a resumed run reads its own); the study shares one among its arms
          pool_dir=""))

  if preset in ("gemma_2b", "gemma_7b"):
    c.model.preset = preset
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.data.prompt_buckets = (128, 256, 512)
    c.sampling.max_new_tokens = 256
    c.train.batch_size = 128
    c.train.steps = 5000
    c.train.checkpoint_every = 500
    c.train.eval_every = 500
    c.optimizer.learning_rate = 3e-6
    c.optimizer.warmup_steps = 100
    c.bond.eta = 0.02 if preset == "gemma_7b" else 0.05
    # A reward network of the policy's own family, as in the paper; the bag of words suits the tiny task.
    c.reward_training.model = "transformer"
  elif preset == "small":
    c.model.preset = "small"
    c.data.vocab_size = 8192
  elif preset == "smoke":  # the whole pipeline in a minute or two: tests and installation checks
    c.model.preset = "micro"
    c.data.vocab_size = 512
    c.data.max_conversations = 300
    c.data.prompt_buckets = (32, 64)
    c.sft.update(steps=12, batch_size=8, seq_len=64, eval_every=12, eval_batches=2, checkpoint_every=12,
                 log_every=4)
    # The network reward model: the smoke covers its training loop (resume, checkpoints, export); the bag
    # of words has its own tests (tests/stages/test_reward_model.py).
    c.reward_training.update(steps=8, batch_size=8, max_len=64, buckets=(64,), eval_every=8,
                             checkpoint_every=8, log_every=4, model="transformer")
    c.sampling.max_new_tokens = 12
    c.train.update(steps=6, batch_size=8, log_every=2, eval_every=3, checkpoint_every=2)
    c.eval.update(num_prompts=8, quantile_samples=16, policy_samples=4)
  elif preset != "tiny":
    raise ValueError(f"unknown preset {preset!r} for configs/dialogue.py; allowed: tiny, small, smoke, "
                     "gemma_2b, gemma_7b")
  return c
