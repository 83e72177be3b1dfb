"""vLLM's side of bench/sampling.py, run by the peer venv's python (bench/setup_vllm.sh), never imported.

    bench/.venv-vllm/bin/python bench/vllm_peer.py MODEL_DIR DTYPE

Loads the exported Hugging Face directory once (token ids only: no tokenizer), then answers one JSON
request a line on stdin, {"prompts": [[ids]], "n": N, "max_tokens": T, "stop_ids": [ids]}, with one line
"@@ {"seconds": s, "tokens": t}" on stdout: the wall time of LLM.generate and the new tokens it returned.
stop_ids empty: exactly T tokens (ignore_eos, min_tokens = T); else a response ends at any of them.
Temperature 1 with no truncation, as bench/sampling.py samples on the other sides.
"""

import json
import sys
import time

PREFIX = "@@ "


def main():
  model_dir, dtype = sys.argv[1:3]
  from vllm import LLM, SamplingParams
  from vllm.inputs import TokensPrompt
  llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype=dtype, gpu_memory_utilization=0.25, seed=0)
  print(PREFIX + json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    stop = request["stop_ids"]
    params = SamplingParams(n=request["n"], max_tokens=request["max_tokens"],
                            min_tokens=0 if stop else request["max_tokens"], ignore_eos=not stop,
                            stop_token_ids=stop or None, temperature=1.0, top_p=1.0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
    began = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - began
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(PREFIX + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


if __name__ == "__main__":
  main()
