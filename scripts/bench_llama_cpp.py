#!/usr/bin/env python3
"""llama.cpp side of scripts/bench_cpu.sh, through llama-cpp-python (pinned in
scripts/requirements-llama-server.txt, built from its sources for this machine's CPU).

    python scripts/bench_llama_cpp.py convert SRC.gguf DST.gguf f32|f16
        DST with every tensor in F32 (or F16, norms stay F32), made by llama.cpp's own
        quantize API from SRC (the default Q4_1 GGUF): the same weights tsr computes with.

    python scripts/bench_llama_cpp.py generate MODEL.gguf BATCH PROMPT NEW THREADS [TEMP TOP_P]
        What `tsr bench --only generate --ignore-end-of-turn` measures: BATCH rows of the same
        PROMPT-token prompt (tsr's bench text), one prefill of all rows, then decoding of NEW
        tokens per row in batched decode steps, end-of-turn ignored, so both sides make
        BATCH x NEW tokens; prints `RESULT ... new tok/s`, prefill included. Greedy, or with
        TEMP and TOP_P sampled by llama.cpp's own sampler chain (temperature, top-p, then a
        draw; one chain per row). NEW = 1 measures the prefill (prompt processing).
"""
import ctypes
import sys
import time

import llama_cpp as L
import numpy as np

TEXT = ("Write a long story about a brave knight who travels across the kingdom to find "
        "a dragon, and describe every village, river and mountain on the way. ") * 24


def convert(src, dst, kind):
    params = L.llama_model_quantize_default_params()
    params.ftype = {"f32": L.LLAMA_FTYPE_ALL_F32, "f16": L.LLAMA_FTYPE_MOSTLY_F16}[kind]
    params.allow_requantize = True
    params.pure = True
    rc = L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"bench_llama_cpp: llama.cpp could not convert {src} to {kind} (code {rc})")


def generate(path, batch, prompt, new, threads, temp=None, top_p=None):
    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        sys.exit(f"bench_llama_cpp: llama.cpp could not load {path}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    buf = (L.llama_token * 4096)()
    n = L.llama_tokenize(vocab, TEXT.encode(), len(TEXT.encode()), buf, 4096, False, False)
    if n < prompt:
        sys.exit(f"bench_llama_cpp: the bench text has {n} tokens, fewer than {prompt}")
    ids = list(buf[:prompt])

    cp = L.llama_context_default_params()
    cp.n_ctx = batch * (prompt + new + 16)
    cp.n_batch = max(batch * prompt, 512)
    cp.n_ubatch = cp.n_batch
    cp.n_seq_max = batch
    cp.n_threads = threads
    cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit("bench_llama_cpp: llama.cpp could not create a context")
    lb = L.llama_batch_init(batch * prompt, 0, 1)

    def fill(entries):
        """entries: (token, pos, seq, wants_logits) in order."""
        lb.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            lb.token[i] = tok
            lb.pos[i] = pos
            lb.n_seq_id[i] = 1
            lb.seq_id[i][0] = seq
            lb.logits[i] = 1 if out else 0

    def decode():
        rc = L.llama_decode(ctx, lb)
        if rc != 0:
            sys.exit(f"bench_llama_cpp: llama_decode failed (code {rc})")

    def argmax(i):
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    chains = []
    if temp is not None:
        for r in range(batch):
            c = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            L.llama_sampler_chain_add(c, L.llama_sampler_init_temp(temp))
            L.llama_sampler_chain_add(c, L.llama_sampler_init_top_p(top_p, 1))
            L.llama_sampler_chain_add(c, L.llama_sampler_init_dist(r))
            chains.append(c)

    def pick(r, i):
        return L.llama_sampler_sample(chains[r], ctx, i) if chains else argmax(i)

    def run(rows, steps):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        fill([(t, j, r, j == prompt - 1) for r in range(rows) for j, t in enumerate(ids)])
        decode()
        nxt = [pick(r, r * prompt + prompt - 1) for r in range(rows)]
        made = rows
        for s in range(steps - 1):
            fill([(nxt[r], prompt + s, r, True) for r in range(rows)])
            decode()
            nxt = [pick(r, r) for r in range(rows)]
            made += rows
        return made

    run(batch, 4)  # warm-up
    t = time.perf_counter()
    made = run(batch, new)
    dt = time.perf_counter() - t
    how = "greedy" if temp is None else f"temperature {temp}, top-p {top_p}"
    print(f"RESULT generate batch {batch}: {made / dt:.1f} new tok/s ({made} tokens in {dt:.2f} s, "
          f"prefill included; {prompt}-token prompts, {new} new, {how}; {threads} threads)")
    for c in chains:
        L.llama_sampler_free(c)
    L.llama_batch_free(lb)
    L.llama_free(ctx)
    L.llama_model_free(model)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "convert":
        convert(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 7 and sys.argv[1] == "generate":
        generate(sys.argv[2], *(int(a) for a in sys.argv[3:7]))
    elif len(sys.argv) == 9 and sys.argv[1] == "generate":
        generate(sys.argv[2], *(int(a) for a in sys.argv[3:7]), float(sys.argv[7]), float(sys.argv[8]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
