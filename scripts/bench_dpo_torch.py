#!/usr/bin/env python3
"""PyTorch side of the DPO step benchmark (steps/examples/bench_dpo.rs), for the ratio.

A minimal Llama in plain PyTorch (HF semantics: RMSNorm, half-split rope, SDPA causal attention,
SiLU MLP, tied embeddings) loaded from a Hugging Face folder written by `tsr` (`tsr dpo --out`,
`tsr export-model`). One step = reference forward (no_grad) + policy forward/backward over
chosen and rejected + clip_grad_norm_(1.0) + torch.optim.AdamW, on one pair of P prompt + R
response tokens, f32 on CPU. Needs only torch and numpy (no transformers, no safetensors).
`scripts/bench_torch_gpu.py` imports `Llama` from here (any device and dtype, optional KV cache).

Run: python3 scripts/bench_dpo_torch.py MODEL_DIR [STEPS]
"""
import json, math, statistics, sys, time, copy, resource
import numpy as np
import torch
import torch.nn.functional as F


def load_safetensors(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        assert info["dtype"] == "F32"
        out[name] = torch.from_numpy(np.frombuffer(data[a:b], dtype=np.float32).reshape(info["shape"]).copy())
    return out


class Llama(torch.nn.Module):
    def __init__(self, cfg, w):
        super().__init__()
        self.cfg = cfg
        self.p = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v) for k, v in w.items()})
        hd = cfg["head_dim"]
        self.inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    def w(self, name):
        return self.p[name.replace(".", "__")]

    def norm(self, x, w):
        # In f32 and cast back, as transformers does (a no-op for f32 weights).
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"])).to(x.dtype) * w

    def forward(self, ids, cache=None):
        """Logits at every position. `cache` (a list, for generation with a KV cache) holds
        one (k, v) per layer from earlier calls; new keys/values are appended to it and the
        positions continue after them (no padding: every row has the same length)."""
        c = self.cfg
        b, t = ids.shape
        nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        emb = self.w("model.embed_tokens.weight")
        x = F.embedding(ids, emb)
        past = cache[0][0].shape[2] if cache else 0
        pos = torch.arange(past, past + t, dtype=torch.float32, device=ids.device)
        freqs = torch.outer(pos, self.inv_freq.to(ids.device))
        cos, sin = torch.cat([freqs.cos()] * 2, -1).to(x.dtype), torch.cat([freqs.sin()] * 2, -1).to(x.dtype)

        def rope(q):
            q1, q2 = q[..., : hd // 2], q[..., hd // 2 :]
            return q * cos + torch.cat([-q2, q1], -1) * sin

        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = self.norm(x, self.w(f"{p}.input_layernorm.weight"))
            q = F.linear(h, self.w(f"{p}.self_attn.q_proj.weight")).view(b, t, nh, hd).transpose(1, 2)
            k = F.linear(h, self.w(f"{p}.self_attn.k_proj.weight")).view(b, t, nkv, hd).transpose(1, 2)
            v = F.linear(h, self.w(f"{p}.self_attn.v_proj.weight")).view(b, t, nkv, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
            if cache is not None:
                if len(cache) > i:
                    k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
                    cache[i] = (k, v)
                else:
                    cache.append((k, v))
            k = k.repeat_interleave(nh // nkv, 1)
            v = v.repeat_interleave(nh // nkv, 1)
            # Causal within the new tokens; a single new token sees the whole cache.
            a = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and t > 1)
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, nh * hd), self.w(f"{p}.self_attn.o_proj.weight"))
            h = self.norm(x, self.w(f"{p}.post_attention_layernorm.weight"))
            g = F.silu(F.linear(h, self.w(f"{p}.mlp.gate_proj.weight")))
            x = x + F.linear(g * F.linear(h, self.w(f"{p}.mlp.up_proj.weight")), self.w(f"{p}.mlp.down_proj.weight"))
        x = self.norm(x, self.w("model.norm.weight"))
        return F.linear(x, emb)  # tied lm_head, logits at every position (as transformers)


def response_logps(model, ids, p):
    logits = model(ids)[:, p - 1 : -1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, p:].unsqueeze(-1)).squeeze(-1).sum(-1)


def main():
    d = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    cfg = json.load(open(f"{d}/config.json"))
    policy = Llama(cfg, load_safetensors(f"{d}/model.safetensors"))
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-7, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for p, r in [(64, 64), (128, 128)]:
        prompt = torch.randint(0, cfg["vocab_size"], (p,), generator=g)
        ids = torch.stack([torch.cat([prompt, torch.randint(0, cfg["vocab_size"], (r,), generator=g)]) for _ in range(2)])
        times = []
        for i in range(steps):
            s = time.perf_counter()
            with torch.no_grad():
                rl = response_logps(ref, ids, p)
            lp = response_logps(policy, ids, p)
            loss = -F.logsigmoid(0.1 * ((lp[0] - rl[0]) - (lp[1] - rl[1])))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            dt = time.perf_counter() - s
            print(f"{p}+{r} step {i}: {dt:.2f} s, loss {loss.item():.6f}, grad norm {norm.item():.4f}")
            if i > 0:
                times.append(dt)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"RESULT {p}+{r}: median step {statistics.median(times):.2f} s over {len(times)} steps "
              f"(min {min(times):.2f}, max {max(times):.2f}); peak RSS so far {peak:.0f} MB")


if __name__ == "__main__":
    main()
