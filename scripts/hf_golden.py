#!/usr/bin/env python3
"""Reference files for tsr's compatibility tests with transformers and TRL.

Run through `scripts/hf_golden.sh`, which builds tsr, creates the pinned virtual environments
(`scripts/requirements-hf-golden.txt`: transformers 5 + TRL; `scripts/requirements-hf-golden-4x.txt`:
transformers 4.57) and calls this script in each. Everything written lands in
`tests/fixtures/hf/`; the Rust tests (`model/tests/hf_compat.rs`, `tests/export_compat.rs`)
compare tsr with these files and never need torch.

Phases (one call each):

  fixtures OUT TOKENIZER_DIR
      Tiny random-weight models of each architecture and RoPE form, written by this
      transformers version's own `save_pretrained` (weights and tokenizer), with a golden of
      token ids and summed response log-probs computed by the same transformers.
  roundtrip OUT NAME EXPORT_DIR
      A folder written by `tsr export`: the token ids transformers' `AutoTokenizer` gives for
      test texts and chat prompts, the special tokens and stop ids it reads, and the summed
      log-probs `AutoModelForCausalLM` gives for test pairs.
  check OUT NAME...
      transformers computes on tsr's exports of those fixtures what it computed on the fixtures.
  trl OUT EXPORT_DIR
      TRL's own DPO dataset processing (`DPOTrainer`) of pairs in the two formats
      `tsr export RUN pairs` writes: the prompt / chosen / rejected token ids TRL trains on.

Conventions shared with tsr: prompt ids = the chat template applied to one user turn with the
generation prompt; response ids = the response text tokenized without special tokens, then the
end-of-turn (eos) token; log-prob = the sum over response tokens, in float32.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
MAJOR = int(transformers.__version__.split(".")[0])

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Prompt/response pairs: one short, two longer than the small windows and context lengths the
# fixtures use (so sliding windows, dynamic RoPE and YaRN's ramp all matter).
PAIRS = [
    ("Hi", "Hello!"),
    ("What is the capital of France?", "The capital of France is Paris. The capital of Italy is Rome."),
    (
        "Please explain why the sky is blue, step by step.",
        "Sunlight is scattered by the air, and blue light is scattered the most; "
        "in 2024 it was 366 days of blue.",
    ),
]

# Raw token ids (no chat template), 8 tokens in all: short enough for the small sliding windows.
RAW_PAIRS = [([5, 6, 7], [8, 9, 10, 11, 12]), ([40, 41], [42, 43, 44, 45, 46, 2])]

# Texts whose tokenization tells tokenizer pipelines apart (digit splitting, prefix spaces,
# special-token text, newlines before digits).
TEXTS = [
    "\n\n2.",
    "The year 2024 had 366 days.",
    " leading space",
    "<|im_start|>user\nhi<|im_end|>\n",
    "Tabs\tand  double  spaces,\r\nand unicode: caf\u00e9 \u2014 \u65e5\u672c.",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prompt_ids(tok, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def response_ids(tok, response):
    return tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def summed_logprob(model, p_ids, r_ids):
    ids = torch.tensor([p_ids + r_ids])
    logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[0, len(p_ids) - 1 : -1], dim=-1)
    return float(logp.gather(1, torch.tensor(r_ids)[:, None]).sum())


def score_pairs(load_model, tok):
    """Each pair on a freshly loaded model: dynamic RoPE keeps state across calls."""
    out = []
    for prompt, response in PAIRS:
        p, r = prompt_ids(tok, prompt), response_ids(tok, response)
        model = load_model()
        out.append({"prompt": prompt, "response": response, "prompt_ids": p, "response_ids": r,
                    "logprob": summed_logprob(model, p, r), "tokens": len(p) + len(r)})
    return out


def init_weights(model, seed):
    """Weights large enough that attention (and so RoPE) changes the log-probs by whole nats."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name or name.startswith("lm_head"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            p.copy_(gain / p.shape[-1] ** 0.5 * torch.randn(p.shape, generator=g))


BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)


def rope(theta, **kw):
    """RoPE settings in this transformers version's own form."""
    if MAJOR >= 5:
        return {"rope_parameters": {"rope_theta": theta, "rope_type": kw.pop("rope_type", "default"), **kw}}
    kind = kw.pop("rope_type", "default")
    return {"rope_theta": theta, "rope_scaling": None if kind == "default" else {"rope_type": kind, **kw}}


def fixture_specs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=64)
    specs = {
        "llama-llama3": (LlamaConfig, dict(**rope(500000.0, **llama3), max_position_embeddings=256), torch.bfloat16),
        "qwen2": (Qwen2Config, dict(**rope(1e6), max_position_embeddings=256), torch.float32),
    }
    if MAJOR >= 5:
        specs.update({
            "llama-linear": (LlamaConfig, dict(**rope(10000.0, rope_type="linear", factor=4.0)), torch.bfloat16),
            "llama-dynamic": (LlamaConfig, dict(**rope(10000.0, rope_type="dynamic", factor=2.0),
                                                max_position_embeddings=16), torch.bfloat16),
            "llama-yarn": (LlamaConfig, dict(**rope(10000.0, rope_type="yarn", factor=4.0,
                                                    original_max_position_embeddings=32),
                                             max_position_embeddings=128), torch.bfloat16),
            "llama-head-dim": (LlamaConfig, dict(**rope(10000.0), head_dim=24), torch.float16),
            "mistral": (MistralConfig, dict(**rope(1e6), sliding_window=4096), torch.float32),
            "mistral-window": (MistralConfig, dict(**rope(1e4), sliding_window=8), torch.bfloat16),
            "qwen2-sliding": (Qwen2Config, dict(**rope(1e6), use_sliding_window=True, sliding_window=8,
                                                max_window_layers=1), torch.bfloat16),
        })
    return specs


def tiny_tokenizer(tokenizer_dir):
    """tsr's tiny tokenizer (tokenizer.json), as a transformers tokenizer."""
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"),
                                  bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tok


def phase_fixtures(out, tokenizer_dir):
    tok = tiny_tokenizer(tokenizer_dir)
    goldens = {}
    for i, (name, (cls, kw, dtype)) in enumerate(sorted(fixture_specs().items())):
        suffix = "" if MAJOR >= 5 else f"-{MAJOR}x"
        folder = os.path.join(out, name + suffix)
        shutil.rmtree(folder, ignore_errors=True)
        cfg = cls(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2, **{**BASE, **kw})
        model = AutoModelForCausalLM.from_config(cfg)
        init_weights(model, 1000 + i)
        model.to(dtype).save_pretrained(folder)
        tok.save_pretrained(folder)

        def load():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        saved = AutoTokenizer.from_pretrained(folder)
        goldens[name + suffix] = {
            "written_by": f"transformers {transformers.__version__}",
            "config": json.load(open(os.path.join(folder, "config.json"))),
            "pairs": score_pairs(load, saved),
            "raw_pairs": [{"prompt_ids": p, "response_ids": r, "logprob": summed_logprob(load(), p, r)}
                          for p, r in RAW_PAIRS],
        }
        print(f"{name + suffix}: {[round(p['logprob'], 3) for p in goldens[name + suffix]['pairs']]}", file=sys.stderr)
    result = {"transformers": transformers.__version__, "torch": torch.__version__, "models": goldens}
    if MAJOR >= 5:
        result["rope_cases"] = rope_cases()
    write_json(os.path.join(out, f"goldens-transformers{MAJOR}.json"), result)


def rope_cases():
    """Inverse frequencies and attention factors straight from transformers' RoPE functions,
    for settings the tiny models do not cover (the config as transformers serializes it)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    shape = dict(hidden_size=256, num_attention_heads=2, head_dim=128, num_key_value_heads=1)
    cases = [
        ("llama3.1", dict(max_position_embeddings=131072, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), None),
        ("llama3 top-level original_max_position_embeddings", dict(
            max_position_embeddings=4096, original_max_position_embeddings=1024, rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0}), None),
        ("linear", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), None),
        ("dynamic below max", dict(max_position_embeddings=64, rope_parameters={
            "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), 40),
        ("dynamic above max", dict(max_position_embeddings=64, rope_parameters={
            "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), 100),
        ("yarn mscale", dict(max_position_embeddings=16384, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096,
            "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0}), None),
        ("yarn no truncation", dict(max_position_embeddings=16384, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 4096,
            "truncate": False}), None),
        ("yarn null truncate", dict(max_position_embeddings=16384, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 4096,
            "truncate": None}), None),
        ("yarn attention factor", dict(max_position_embeddings=8192, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 4096,
            "attention_factor": 1.25}), None),
    ]
    out = []
    for name, kw, seq_len in cases:
        cfg = LlamaConfig(**shape, **kw)
        if seq_len is None:
            rot = LlamaRotaryEmbedding(cfg)
            inv, att = rot.inv_freq, rot.attention_scaling
        else:
            inv, att = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu", seq_len=seq_len)
        config = json.loads(cfg.to_json_string())
        out.append({"name": name, "config": config, "seq_len": seq_len or 1,
                    "inv_freq": [float(x) for x in inv], "attention_factor": float(att)})
    return out


def phase_roundtrip(out, name, export_dir):
    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    result = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "files": {f: sha256(os.path.join(export_dir, f)) for f in sorted(os.listdir(export_dir))},
        "tokenizer_class": type(tok).__name__,
        "special_tokens": {"eos": tok.eos_token, "bos": tok.bos_token, "pad": tok.pad_token},
        "generation_eos_token_ids": eos,
        "texts": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS],
        "pairs": score_pairs(lambda: AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval(), tok),
        "raw_pairs": [{"prompt_ids": p, "response_ids": r, "logprob": summed_logprob(model, p, r)}
                      for p, r in RAW_PAIRS],
    }
    write_json(os.path.join(out, f"roundtrip-{name}-transformers{MAJOR}.json"), result)


def trl_rows(fmt, tok):
    """The TRL fields `tsr export RUN pairs --format FMT` writes (see steps/src/trl.rs)."""
    rows = []
    for (prompt, chosen), (_, rejected) in zip(PAIRS, PAIRS[1:] + PAIRS[:1]):
        if fmt == "conversational":
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
            rows.append({"prompt": rendered, "chosen": chosen + tok.eos_token, "rejected": rejected + tok.eos_token})
    return rows


def phase_trl(out, export_dir):
    import datasets
    import trl
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    result = {"trl": trl.__version__, "transformers": transformers.__version__, "formats": {}}
    for fmt in ["conversational", "standard"]:
        rows = trl_rows(fmt, tok)
        with tempfile.TemporaryDirectory() as tmp:
            args = DPOConfig(output_dir=tmp, report_to="none", per_device_train_batch_size=1, max_length=None,
                             dataset_num_proc=None, use_cpu=True)
            trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok)
            processed = trainer.train_dataset
        result["formats"][fmt] = [
            {"row": row, "prompt_ids": list(ex["prompt_ids"]), "chosen_ids": list(ex["chosen_ids"]),
             "rejected_ids": list(ex["rejected_ids"])}
            for row, ex in zip(rows, processed)
        ]
    write_json(os.path.join(out, "trl.json"), result)


def phase_check(out, *names):
    """transformers computes on tsr's export of a fixture exactly what it computed on the
    fixture itself (same weights, now f32): the export preserved every setting."""
    g = json.load(open(os.path.join(out, "goldens-transformers5.json")))["models"]
    for name in names:
        for major in (5, 4):
            r = json.load(open(os.path.join(out, f"roundtrip-fixture-{name}-transformers{major}.json")))
            for kind in ("pairs", "raw_pairs"):
                for a, b in zip(g[name][kind], r[kind]):
                    assert abs(a["logprob"] - b["logprob"]) < 1e-4, (name, major, kind, a["logprob"], b["logprob"])
    print(f"exports of {len(names)} fixtures read the same in transformers 5 and 4", file=sys.stderr)


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    phase, out, *rest = sys.argv[1:]
    os.makedirs(out, exist_ok=True)
    {"fixtures": phase_fixtures, "roundtrip": phase_roundtrip, "trl": phase_trl, "check": phase_check}[phase](out, *rest)
