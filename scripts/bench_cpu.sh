#!/usr/bin/env bash
# tsr against the tools a user would otherwise pick, on this machine's CPU, in one run: each
# measure alternates tsr and its peer ROUNDS times (default 3), then one table of medians,
# ranges and ratios is printed (and written to target/bench-cpu/table.md) after the machine's
# bounds (`tsr bench --only bounds`).
#
#   scripts/bench_cpu.sh [ROUNDS]
#   scripts/busy.sh -n 1 scripts/bench_cpu.sh      # the same beside one busy core
#
# Measures (SmolLM2-135M-Instruct, the default GGUF's weights on both sides, f32 unless said):
#   generation, 64-token prompts, 128 new tokens, end-of-turn ignored: greedy at batch 16 and 1,
#     and sampled (temperature 0.7, top-p 0.9, as workflows sample) at batch 16; and greedy at
#     batch 16 and 1 with the weights in f16 (`--gen-weights f16`, a generation step's
#     `weights = "f16"`) against llama.cpp's F16 GGUF:
#     `tsr bench --only generate` against llama.cpp (scripts/bench_llama_cpp.py: llama-cpp-python
#     as pinned in scripts/requirements-llama-server.txt, built by scripts/test.sh for this CPU,
#     reading an F32 GGUF that llama.cpp's own quantize API makes from the default GGUF);
#   prefill of judge-length prompts: 4 rows of 512 tokens and one new token, as prompt tokens
#     per second, against llama.cpp's prompt processing; tsr with a run's `prompt_attention`
#     both ways (`--gen-attention batched`, and `fused`, a new run's default and the bench's);
#     and a logprob judge's forward over the same prompts (`tsr bench --only judge`: the scoring
#     forward when batched, generation's prefill when fused) against the same llama.cpp figure;
#   a full DPO step and a LoRA r16 step, 64+64 and 128+128 tokens, reference log-probs
#     precomputed: the `bench_dpo` example against PyTorch + transformers and PEFT
#     (scripts/bench_lora_torch.py, the pinned venv of scripts/requirements-hf-golden.txt,
#     several GB on first use) reading `tsr export-model` of the same GGUF.
# Threads: RAYON_NUM_THREADS for tsr, the same number for llama.cpp and torch (default: the
# physical cores tsr would use). Out of CI: it takes about 16 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
case "$rounds" in ''|*[!0-9]*|0) echo "bench_cpu: ROUNDS must be a positive whole number, not \`$rounds\`" >&2; exit 2 ;; esac
cache=${XDG_CACHE_HOME:-$HOME/.cache}/tsr
out=target/bench-cpu
mkdir -p "$out" "$cache/bench-cpu"
rm -f "$out"/r*-*.txt

lcpp=${TSR_LLAMA_SERVER_PYTHON:-$cache/llama-cpp-server/bin/python}
"$lcpp" -c "import llama_cpp" 2>/dev/null \
  || { echo "bench_cpu: llama-cpp-python is not built at $lcpp: run scripts/test.sh once (it builds it), or set TSR_LLAMA_SERVER_PYTHON" >&2; exit 1; }
torchpy=$(scripts/golden-venv.sh transformers5 scripts/requirements-hf-golden.txt)
gguf=$(scripts/fetch-model.sh)
cargo build --release --quiet --bin tsr
cargo build --release --quiet -p tsr-steps --example bench_dpo
tsr=target/release/tsr
# The bounds, measured with tsr's own thread count (RAYON_NUM_THREADS if set), which every
# side then uses.
"$tsr" bench --only bounds >"$out/bounds.txt" 2>&1
threads=$(sed -n 's/^bounds (\([0-9]*\) threads).*/\1/p' "$out/bounds.txt" | head -1)
[ -n "$threads" ] || { echo "bench_cpu: tsr bench --only bounds gave no thread count (see $out/bounds.txt)" >&2; exit 1; }
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads

f32=$cache/bench-cpu/$(basename "$gguf" .gguf).F32.gguf
[ -s "$f32" ] || "$lcpp" scripts/bench_llama_cpp.py convert "$gguf" "$f32" f32 >"$out/convert.log" 2>&1 \
  || { echo "bench_cpu: llama.cpp could not make the F32 GGUF (see $out/convert.log)" >&2; exit 1; }
f16=$cache/bench-cpu/$(basename "$gguf" .gguf).F16.gguf
[ -s "$f16" ] || "$lcpp" scripts/bench_llama_cpp.py convert "$gguf" "$f16" f16 >"$out/convert16.log" 2>&1 \
  || { echo "bench_cpu: llama.cpp could not make the F16 GGUF (see $out/convert16.log)" >&2; exit 1; }
hf=$out/hf-model
[ -s "$hf/model.safetensors" ] || "$tsr" export-model --model "$gguf" --out "$hf" --force >/dev/null

for r in $(seq "$rounds"); do
  echo "bench_cpu: round $r of $rounds" >&2
  for b in 16 1; do
    "$tsr" bench --only generate --temperature 0 --ignore-end-of-turn --model "$gguf" --gen-batch "$b" \
      --gen-prompt-tokens 64 --gen-new-tokens 128 >"$out/r$r-tsr-gen$b.txt" 2>&1
    "$lcpp" scripts/bench_llama_cpp.py generate "$f32" "$b" 64 128 "$threads" >"$out/r$r-lcpp-gen$b.txt" 2>&1
    "$tsr" bench --only generate --temperature 0 --ignore-end-of-turn --model "$gguf" --gen-batch "$b" \
      --gen-prompt-tokens 64 --gen-new-tokens 128 --gen-weights f16 >"$out/r$r-tsr-gen$b-f16.txt" 2>&1
    "$lcpp" scripts/bench_llama_cpp.py generate "$f16" "$b" 64 128 "$threads" >"$out/r$r-lcpp-gen$b-f16.txt" 2>&1
  done
  "$tsr" bench --only generate --temperature 0.7 --top-p 0.9 --ignore-end-of-turn --model "$gguf" \
    --gen-batch 16 --gen-prompt-tokens 64 --gen-new-tokens 128 >"$out/r$r-tsr-sample.txt" 2>&1
  "$lcpp" scripts/bench_llama_cpp.py generate "$f32" 16 64 128 "$threads" 0.7 0.9 >"$out/r$r-lcpp-sample.txt" 2>&1
  "$tsr" bench --only generate --temperature 0 --model "$gguf" --gen-batch 4 \
    --gen-prompt-tokens 512 --gen-new-tokens 1 --gen-attention batched >"$out/r$r-tsr-prefill.txt" 2>&1
  "$lcpp" scripts/bench_llama_cpp.py generate "$f32" 4 512 1 "$threads" >"$out/r$r-lcpp-prefill.txt" 2>&1
  "$tsr" bench --only generate --temperature 0 --model "$gguf" --gen-batch 4 \
    --gen-prompt-tokens 512 --gen-new-tokens 1 --gen-attention fused >"$out/r$r-tsr-prefill-fused.txt" 2>&1
  "$tsr" bench --only judge --model "$gguf" --gen-batch 4 --gen-prompt-tokens 512 --gen-attention batched \
    >"$out/r$r-tsr-judge.txt" 2>&1
  "$tsr" bench --only judge --model "$gguf" --gen-batch 4 --gen-prompt-tokens 512 --gen-attention fused \
    >"$out/r$r-tsr-judge-fused.txt" 2>&1
  target/release/examples/bench_dpo "$gguf" 4 >"$out/r$r-tsr-full.txt" 2>&1
  "$torchpy" scripts/bench_lora_torch.py "$hf" full 4 >"$out/r$r-torch-full.txt" 2>&1
  target/release/examples/bench_dpo "$gguf" 4 r=16,alpha=32 >"$out/r$r-tsr-lora.txt" 2>&1
  "$torchpy" scripts/bench_lora_torch.py "$hf" lora 4 >"$out/r$r-torch-lora.txt" 2>&1
done

python3 - "$out" "$rounds" "$threads" <<'PY'
import re, statistics, sys, pathlib, platform, datetime
out, rounds, threads = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def grab(name, pattern, f=float):
    vals = []
    for r in range(1, rounds + 1):
        text = (out / f"r{r}-{name}.txt").read_text()
        m = re.search(pattern, text)
        if not m:
            sys.exit(f"bench_cpu: no result in {out}/r{r}-{name}.txt")
        vals.append(f(m.group(1)))
    return vals

prompt_tps = lambda secs: 4 * 512 / float(secs)

rows = []
for b in (16, 1):
    rows.append((f"generation, batch {b}, tok/s (higher is better)", "llama.cpp",
                 grab(f"tsr-gen{b}", r"RESULT generate batch \d+: ([\d.]+) new tok/s"),
                 grab(f"lcpp-gen{b}", r"RESULT generate batch \d+: ([\d.]+) new tok/s"), True))
for b in (16, 1):
    rows.append((f"generation, batch {b}, weights in f16, tok/s (higher is better)", "llama.cpp F16",
                 grab(f"tsr-gen{b}-f16", r"RESULT generate batch \d+: ([\d.]+) new tok/s"),
                 grab(f"lcpp-gen{b}-f16", r"RESULT generate batch \d+: ([\d.]+) new tok/s"), True))
rows.append(("generation, batch 16, sampled (T 0.7, top-p 0.9), tok/s (higher is better)", "llama.cpp",
             grab("tsr-sample", r"RESULT generate batch \d+: ([\d.]+) new tok/s"),
             grab("lcpp-sample", r"RESULT generate batch \d+: ([\d.]+) new tok/s"), True))
rows.append(("prefill, 4 x 512-token prompts, prompt_attention batched, prompt tok/s (higher is better)", "llama.cpp",
             grab("tsr-prefill", r"RESULT generate batch \d+: [\d.]+ new tok/s \(\d+ tokens in ([\d.]+) s", prompt_tps),
             grab("lcpp-prefill", r"RESULT generate batch \d+: [\d.]+ new tok/s \(\d+ tokens in ([\d.]+) s", prompt_tps), True))
rows.append(("prefill, 4 x 512, prompt_attention fused (a run's default), prompt tok/s (higher is better)", "llama.cpp",
             grab("tsr-prefill-fused", r"RESULT generate batch \d+: [\d.]+ new tok/s \(\d+ tokens in ([\d.]+) s", prompt_tps),
             grab("lcpp-prefill", r"RESULT generate batch \d+: [\d.]+ new tok/s \(\d+ tokens in ([\d.]+) s", prompt_tps), True))
for how, name in (("judge", "logprob judge's verdict logits, prompt_attention batched"), ("judge-fused", "logprob judge, prompt_attention fused (a run's default)")):
    rows.append((f"{name}, 4 x 512, prompt tok/s (higher is better)", "llama.cpp",
                 grab(f"tsr-{how}", r"RESULT judge batch \d+: ([\d.]+) prompt tok/s"),
                 grab("lcpp-prefill", r"RESULT generate batch \d+: [\d.]+ new tok/s \(\d+ tokens in ([\d.]+) s", prompt_tps), True))
for mode, peer in (("full", "PyTorch"), ("lora", "PEFT")):
    for p in (64, 128):
        rows.append((f"{'full DPO' if mode == 'full' else 'LoRA r16'} step, {p}+{p}, s (lower is better)", peer,
                     grab(f"tsr-{mode}", rf"RESULT {p}\+{p}:.*?without the reference forward ([\d.]+) s"),
                     grab(f"torch-{mode}", rf"RESULT {p}\+{p} {mode}: median step ([\d.]+) s"), False))

bounds = (out / "bounds.txt").read_text()
lines = [f"{datetime.date.today()}, {platform.node()}, {threads} threads, {rounds} rounds alternating tsr and peer", "",
         "| measure | tsr median (range) | peer | peer median (range) | tsr speed / peer |", "|---|---|---|---|---|"]
for name, peer, t, o, higher in rows:
    mt, mo = statistics.median(t), statistics.median(o)
    ratio = mt / mo if higher else mo / mt
    rng = lambda v: f"{min(v):.2f}-{max(v):.2f}"
    lines.append(f"| {name} | {mt:.2f} ({rng(t)}) | {peer} | {mo:.2f} ({rng(o)}) | {ratio:.2f}x |")
lines += ["", "Bounds (`tsr bench --only bounds`):", ""] + [f"    {l}" for l in bounds.splitlines() if l.startswith("bounds")]
table = "\n".join(lines)
(out / "table.md").write_text(table + "\n")
print(table)
PY
