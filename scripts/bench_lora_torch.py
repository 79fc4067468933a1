#!/usr/bin/env python3
"""PyTorch + PEFT side of the LoRA DPO step benchmark (steps/examples/bench_dpo.rs with a LORA
argument), measured in the same session for BENCHMARKS.md.

transformers' model from a Hugging Face folder (e.g. `tsr export-model` of the default GGUF), f32
on CPU. Per length (64+64 and 128+128 tokens, one pair): reference log-probs precomputed once
(as tsr's workflows do), then each step = policy forward/backward on chosen and rejected +
clip_grad_norm_(1.0) + AdamW. MODE `lora`: PEFT LoRA r=16, alpha=32 on the seven projections;
MODE `full`: every weight trains.

Run (the pinned environment of scripts/requirements-hf-golden.txt):
    python scripts/bench_lora_torch.py MODEL_DIR lora|full [STEPS]
"""
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def logps(model, ids, p):
    logits = model(input_ids=ids).logits[:, p - 1 : -1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, p:].unsqueeze(-1)).squeeze(-1).sum(-1)


def main():
    d, mode = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-7, weight_decay=0.0)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, mode {mode}, "
          f"{sum(p.numel() for p in params)} trainable parameters")
    for p, r in [(64, 64), (128, 128)]:
        prompt = torch.randint(0, vocab, (p,), generator=g)
        ids = torch.stack([torch.cat([prompt, torch.randint(0, vocab, (r,), generator=g)]) for _ in range(2)])
        with torch.no_grad():
            ref = logps(model, ids, p)
        times = []
        for i in range(steps):
            s = time.perf_counter()
            lp = logps(model, ids, p)
            loss = -F.logsigmoid(0.1 * ((lp[0] - ref[0]) - (lp[1] - ref[1])))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            dt = time.perf_counter() - s
            print(f"{p}+{r} step {i}: {dt:.2f} s, loss {loss.item():.6f}")
            if i > 0:
                times.append(dt)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"RESULT {p}+{r} {mode}: median step {statistics.median(times):.2f} s over {len(times)} steps "
              f"(min {min(times):.2f}, max {max(times):.2f}); peak RSS so far {peak:.0f} MB")


if __name__ == "__main__":
    main()
