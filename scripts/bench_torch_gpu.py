#!/usr/bin/env python3
"""PyTorch side of `tsr bench`: the same shapes, token ids, FLOP model and printed
figures, so one GPU session measures both sides.

  DPO:        batch B pairs of P prompt + R response tokens; one step = reference forward
              (no_grad) + policy forward/backward over chosen and rejected + clip_grad_norm_(1.0)
              + torch.optim.AdamW(lr 5e-7, weight_decay 0); one warm-up step, then --steps timed.
  generation: batch G, a prompt of PG tokens, exactly N new tokens sampled at temperature 1
              (softmax sampling, no top-p / top-k; end-of-turn is not a stop, so every row
              makes N tokens: tsr's rows may stop early and it says how many did).

Each precision mode runs in turn, eager (no torch.compile):
  bf16  weights and activations in bf16 (like `tsr bench --dtype bf16`; AdamW on bf16 params)
  f32   f32 with TF32 off (like tsr's f32: candle's f32 matmul is true f32)
  tf32  f32 weights, matmuls in TF32 (what PyTorch users often get)

The model is SmolLM2-135M's shape with random weights, or --model DIR (a Hugging Face folder,
e.g. from `tsr export-model`; weights do not change the speed). --impl hf uses transformers'
LlamaForCausalLM (SDPA attention, `generate`); --impl plain uses the minimal Llama of
scripts/bench_dpo_torch.py with a KV cache; auto (default) takes hf when transformers imports.

  python3 scripts/bench_torch_gpu.py                       # cuda if available: bf16,f32,tf32
  python3 scripts/bench_torch_gpu.py --device cpu --quick  # smoke test (small shapes)
"""
import argparse, copy, json, math, os, statistics, sys, time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dpo_torch import Llama, load_safetensors  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


# --- the FLOP model: the same formulas as model/src/bench.rs ---------------------------------
def matmul_params(c):
    h, q = c["hidden_size"], c["num_attention_heads"] * c["head_dim"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * c["intermediate_size"]
    return c["num_hidden_layers"] * per_layer + c["vocab_size"] * h


def forward_flops_per_token(c, seq):
    return 2 * matmul_params(c) + 4 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * seq


def dpo_flops_per_pair(c, p, r):
    return 2 * (p + r) * 4 * forward_flops_per_token(c, p + r)


def synthetic_ids(vocab, row, n, a, b):
    span = min(max(vocab - 100, 1), 40000)
    return [100 + (row * a + j * b) % span for j in range(n)]


# --- models ------------------------------------------------------------------------------------
def random_state(c, gen):
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}"
        shapes.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                       f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                       f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q),
                       f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
                       f"{p}.mlp.down_proj.weight": (h, i)})
    return {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02) for k, s in shapes.items()}


class Model:
    """One interface over both implementations: logits(ids) and generate(ids, n, temperature)."""

    def __init__(self, impl, cfg, state, device, dtype):
        self.impl, self.cfg = impl, cfg
        if impl == "hf":
            from transformers import LlamaConfig, LlamaForCausalLM
            hc = LlamaConfig(**cfg, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                             pad_token_id=2, attn_implementation="sdpa")
            m = LlamaForCausalLM(hc)
            if state is not None:
                m.load_state_dict(state, strict=False)
                m.tie_weights()
            self.m = m.to(device=device, dtype=dtype)
        else:
            self.m = Llama(cfg, state).to(device=device, dtype=dtype)

    def parameters(self):
        return self.m.parameters()

    def logits(self, ids):
        return self.m(ids).logits if self.impl == "hf" else self.m(ids)

    @torch.no_grad()
    def generate(self, ids, n, temperature):
        if self.impl == "hf":
            return self.m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                   temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=n,
                                   min_new_tokens=n, pad_token_id=2, eos_token_id=2)[:, ids.shape[1]:]
        cache, out = [], []
        logits = self.m(ids, cache)[:, -1]
        for _ in range(n):
            probs = torch.softmax(logits.float() / temperature, -1)
            nxt = torch.multinomial(probs, 1)
            out.append(nxt)
            logits = self.m(nxt, cache)[:, -1]
        return torch.cat(out, 1)


def clone_frozen(model):
    ref = copy.deepcopy(model)
    ref.m.requires_grad_(False)
    return ref


# --- measurements ------------------------------------------------------------------------------
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def response_logps(model, ids, p):
    logits = model.logits(ids)[:, p - 1: -1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, p:].unsqueeze(-1)).squeeze(-1).sum(-1)


def bench_dpo(policy, ref, b, p, r, steps, dev):
    v = policy.cfg["vocab_size"]
    rows = []
    for i in range(b):  # (chosen_i, rejected_i) interleaved, as tsr's trainer batches them
        prompt = synthetic_ids(v, i, p, 131, 17)
        rows += [prompt + synthetic_ids(v, i, r, 71, 29), prompt + synthetic_ids(v, i, r, 53, 37)]
    ids = torch.tensor(rows, device=dev)
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-7, weight_decay=0.0)
    times = []
    for i in range(steps + 1):
        sync(dev)
        s = time.perf_counter()
        with torch.no_grad():
            rl = response_logps(ref, ids, p).view(b, 2)
        lp = response_logps(policy, ids, p).view(b, 2)
        margin = (lp[:, 0] - rl[:, 0]) - (lp[:, 1] - rl[:, 1])
        loss = -F.logsigmoid(0.1 * margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        sync(dev)
        dt = time.perf_counter() - s
        print(f"  batch {b} step {i}{' (warm-up)' if i == 0 else ''}: {dt:.3f} s, loss {lv:.6f}", flush=True)
        if i > 0:
            times.append(dt)
    del opt
    return statistics.median(times), len(times)


def bench_generate(model, g, pg, n, temperature, dev):
    v = model.cfg["vocab_size"]
    ids = torch.tensor([synthetic_ids(v, 0, pg, 131, 17)] * g, device=dev)
    model.generate(ids, min(4, n), temperature)  # warm-up at the full batch
    sync(dev)
    s = time.perf_counter()
    out = model.generate(ids, n, temperature)
    sync(dev)
    dt = time.perf_counter() - s
    return out.numel(), dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impl", choices=["auto", "hf", "plain"], default="auto")
    ap.add_argument("--model", help="Hugging Face folder (config.json + model.safetensors, f32)")
    ap.add_argument("--modes", help="comma list of bf16,f32,tf32 (default: all three on CUDA, f32 on CPU)")
    ap.add_argument("--only", choices=["dpo", "generate"])
    ap.add_argument("--dpo-batch", help="comma list (default: 8,32 on CUDA, 1 on CPU)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--response-tokens", type=int, default=128)
    ap.add_argument("--gen-batch", type=int, help="default: 256 on CUDA, 16 on CPU")
    ap.add_argument("--gen-prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--peak-tflops", type=float, help="default on CUDA: 989 (H100 SXM bf16 dense)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: batch 1 of 16+16 tokens, 1 timed step, generation 2 x (8 + 8)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if a.quick:
        a.dpo_batch, a.steps, a.prompt_tokens, a.response_tokens = "1", 1, 16, 16
        a.gen_batch, a.gen_prompt_tokens, a.gen_new_tokens = 2, 8, 8
    batches = [int(x) for x in (a.dpo_batch or ("8,32" if cuda else "1")).split(",")]
    gen_batch = a.gen_batch or (256 if cuda else 16)
    modes = (a.modes or ("bf16,f32,tf32" if cuda else "f32")).split(",")
    peak = a.peak_tflops or (989.0 if cuda else None)
    impl = a.impl
    if impl == "auto":
        try:
            import transformers  # noqa: F401
            impl = "hf"
        except ImportError:
            impl = "plain"

    if a.model:
        cfg = json.load(open(os.path.join(a.model, "config.json")))
        cfg = {k: cfg[k] for k in SMOLLM2_135M if k in cfg}
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        state = load_safetensors(os.path.join(a.model, "model.safetensors"))
        what = a.model
    else:
        cfg = dict(SMOLLM2_135M)
        state = random_state(cfg, torch.Generator().manual_seed(0))
        what = "random weights, SmolLM2-135M shape"
    print(f"torch {torch.__version__} ({impl}), {dev}"
          + (f" {torch.cuda.get_device_name(dev)}" if cuda else f", threads {torch.get_num_threads()}")
          + f"; {what}: {matmul_params(cfg) / 1e6:.1f} M parameters in matmuls", flush=True)

    def mfu(flops):
        return f"MFU {100 * flops / (peak * 1e12):.2f} % of {peak} TFLOP/s" if peak else "MFU n/a (--peak-tflops)"

    for mode in modes:
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            torch.backends.cudnn.allow_tf32 = mode == "tf32"
        s = time.perf_counter()
        policy = Model(impl, cfg, {k: t.clone() for k, t in state.items()}, dev, dtype)
        print(f"[{mode}] model ready in {time.perf_counter() - s:.1f} s", flush=True)
        if a.only != "generate":
            ref = clone_frozen(policy)
            p, r = a.prompt_tokens, a.response_tokens
            fpp = dpo_flops_per_pair(cfg, p, r)
            print(f"[{mode}] DPO: {p} prompt + {r} response tokens; {fpp / 1e9:.1f} GFLOP per pair", flush=True)
            for b in batches:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                try:
                    med, n = bench_dpo(policy, ref, b, p, r, a.steps, dev)
                except torch.OutOfMemoryError:
                    print(f"RESULT [{mode}] dpo batch {b}: out of memory", flush=True)
                    continue
                mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
                print(f"RESULT [{mode}] dpo batch {b}: {b / med:.2f} pairs/s (median step {med:.3f} s over {n}), "
                      f"{b / med * fpp / 1e12:.2f} TFLOP/s, {mfu(b / med * fpp)}{mem}", flush=True)
            del ref
        if a.only != "dpo":
            n, dt = bench_generate(policy, gen_batch, a.gen_prompt_tokens, a.gen_new_tokens, a.temperature, dev)
            print(f"RESULT [{mode}] generate batch {gen_batch}: {n / dt:.1f} new tok/s ({n} tokens in {dt:.2f} s, "
                  f"prefill included; {a.gen_prompt_tokens}-token prompts, exactly {a.gen_new_tokens} new, "
                  f"temperature {a.temperature})", flush=True)
        del policy
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
