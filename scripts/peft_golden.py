#!/usr/bin/env python3
"""Reference files for tsr's PEFT adapter tests (`model/tests/peft_compat.rs`).

Run through `scripts/peft_golden.sh` (the pinned transformers 5 environment of
`scripts/requirements-hf-golden.txt`, which includes PEFT). For two of the tiny models that
transformers wrote (`tests/fixtures/hf/llama-llama3`, `tests/fixtures/hf/qwen2`), PEFT creates a
LoRA adapter, its B matrices are filled with random values (PEFT initialises B to zero, which
would make the adapter a no-op and the test blind), and `save_pretrained` writes it to
`tests/fixtures/peft/<name>/`. The golden holds the summed response log-probs of the fixture's
pairs through `PeftModel.from_pretrained(base, dir)`, and through the base alone (so a test
can tell the adapter was applied).

It also takes one DPO step that trains the first adapter further, as `tsr dpo --adapter`
does (PEFT's `is_trainable`; the reference is the model with the adapter as loaded; the loss
is the mean sigmoid DPO loss over the pairs; the gradient norm is over the adapter's factors,
clipped to 1.0; AdamW with PyTorch's betas and eps, no weight decay), and records the loss
before the step, the gradient norm and the loss after it.

    peft_golden.py FIXTURES_HF OUT_DIR
"""

import json
import os
import sys

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ADAPTERS = {
    # name: (base fixture, LoraConfig arguments)
    "llama-all-linear": ("llama-llama3", dict(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "qwen2-attention": ("qwen2", dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"])),
}


def summed_logprob(model, p_ids, r_ids):
    ids = torch.tensor([p_ids + r_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[0, len(p_ids) - 1 : -1], dim=-1)
    return float(logp.gather(1, torch.tensor(r_ids)[:, None]).sum())


DPO = dict(adapter="llama-all-linear", beta=0.1, lr=1e-3, max_grad_norm=1.0,
           pairs=[("What is the capital of France?", "Paris is the capital.", "London, I think."),
                  ("Name a colour.", "Blue.", "I cannot name colours, sorry about that."),
                  ("Count to three.", "One, two, three.", "Three, two, one, zero.")])


def dpo_step(fixtures, out, base_name):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hf_golden import prompt_ids, response_ids  # tsr's tokenization conventions

    torch.set_grad_enabled(True)
    base_dir = os.path.join(fixtures, base_name)
    tok = AutoTokenizer.from_pretrained(base_dir)
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        os.path.join(out, DPO["adapter"]), is_trainable=True)
    policy.train()
    params = [p for n, p in sorted(policy.named_parameters()) if p.requires_grad]
    assert params and all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    enc = [(prompt_ids(tok, p), response_ids(tok, c), response_ids(tok, r)) for p, c, r in DPO["pairs"]]

    def logp(p_ids, r_ids):
        ids = torch.tensor([p_ids + r_ids])
        logits = policy(input_ids=ids).logits.float()
        lp = torch.log_softmax(logits[0, len(p_ids) - 1 : -1], dim=-1)
        return lp.gather(1, torch.tensor(r_ids)[:, None]).sum()

    def loss_now():
        terms = []
        for (p, c, r), (rc, rr) in zip(enc, ref):
            terms.append(-torch.nn.functional.logsigmoid(DPO["beta"] * ((logp(p, c) - rc) - (logp(p, r) - rr))))
        return torch.stack(terms).mean()

    with torch.no_grad():
        ref = [(float(logp(p, c)), float(logp(p, r))) for p, c, r in enc]
    loss = loss_now()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, DPO["max_grad_norm"])
    opt = torch.optim.AdamW(params, lr=DPO["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt.step()
    with torch.no_grad():
        after = float(loss_now())
    return {"base": base_name, **{k: v for k, v in DPO.items() if k != "pairs"},
            "pairs": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in DPO["pairs"]],
            "loss_before": float(loss.detach()), "grad_norm": float(norm), "loss_after": after,
            "ref_logps": ref}


def main(fixtures, out):
    golden = json.load(open(os.path.join(fixtures, "goldens-transformers5.json")))
    result = {"torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__, "adapters": {}}
    for name, (base_name, kw) in ADAPTERS.items():
        base_dir = os.path.join(fixtures, base_name)
        torch.manual_seed(7)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw))
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for pname, p in sorted(model.named_parameters()):
                if "lora_B" in pname:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        adir = os.path.join(out, name)
        model.save_pretrained(adir)
        loaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adir).eval()
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        pairs = []
        for pair in golden["models"][base_name]["pairs"]:
            p, r = pair["prompt_ids"], pair["response_ids"]
            pairs.append({"prompt": pair["prompt"], "response": pair["response"],
                          "prompt_ids": p, "response_ids": r,
                          "logprob": summed_logprob(loaded, p, r),
                          "base_logprob": summed_logprob(plain, p, r)})
        result["adapters"][name] = {"base": base_name, "lora": kw, "pairs": pairs}
    result["dpo_step"] = dpo_step(fixtures, out, ADAPTERS[DPO["adapter"]][0])
    with open(os.path.join(out, "goldens.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
