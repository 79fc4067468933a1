"""PEFT's side of tsr's LoRA export test (scripts/peft_export_golden.sh).

Loads the base model tsr exported (`tsr export RUN model --node import`) with transformers, puts
the adapter tsr exported (`tsr export RUN model --adapter`) on it with
`PeftModel.from_pretrained`, and writes the summed response log-probs PEFT computes for a few
prompt/response pairs, through the adapter and through `merge_and_unload()`, with the token ids.
"""

import hashlib
import json
import os
import sys

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from hf_golden import prompt_ids, response_ids  # tsr's tokenization conventions
from peft_golden import summed_logprob

PAIRS = [
    ("hello there", "hi, how are you?"),
    ("count to three", "one two three"),
    ("name a colour", "blue"),
]


def main(fixture):
    base_dir = os.path.join(fixture, "base")
    adapter_dir = os.path.join(fixture, "adapter")
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir
    ).eval()
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir
    ).merge_and_unload().eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    pairs = []
    for prompt, response in PAIRS:
        p, r = prompt_ids(tok, prompt), response_ids(tok, response)
        pairs.append({"prompt": prompt, "response": response, "prompt_ids": p, "response_ids": r,
                      "logprob": summed_logprob(model, p, r),
                      "merged_logprob": summed_logprob(merged, p, r),
                      "base_logprob": summed_logprob(plain, p, r)})
    with open(os.path.join(adapter_dir, "adapter_model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    result = {"torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "adapter_sha256": sha, "pairs": pairs}
    with open(os.path.join(fixture, "goldens.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
