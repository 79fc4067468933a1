#!/usr/bin/env python3
"""Reference tokens for judge-length prompts: transformers' greedy continuation of two chat
prompts of SmolLM2-135M-Instruct (the default GGUF as `tsr export-model` writes it, loaded by
transformers, computed in float32 on the CPU), one of about 500 tokens and one short one.

Run through `scripts/long_prompt_golden.sh`, which writes `tests/fixtures/long-prompt/golden.json`
with the pinned environment of `scripts/requirements-hf-golden.txt`. The Rust test
(`model/tests/model_real.rs`) generates from the recorded prompt ids, alone and batched, with
either prompt attention, and compares the tokens; it never needs torch.

    long_prompt_golden.py MODEL_DIR OUT_JSON
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 16

RUBRIC = (
    "Review the user's question and the corresponding response using the additive 5-point "
    "scoring system described below. Points are accumulated based on the satisfaction of each "
    "criterion:\n"
    "- Add 1 point if the response is relevant and provides some information related to the "
    "user's inquiry, even if it is incomplete or contains some irrelevant content.\n"
    "- Add another point if the response addresses a substantial portion of the user's question, "
    "but does not completely resolve the query or provide a direct answer.\n"
    "- Award a third point if the response answers the basic elements of the user's question in a "
    "useful way, regardless of whether it seems to have been written by an AI Assistant or if it "
    "has elements typically found in blogs or search results.\n"
    "- Grant a fourth point if the response is clearly written from an AI Assistant's "
    "perspective, addressing the user's question directly and comprehensively, and is "
    "well-organized and helpful, even if there is slight room for improvement in clarity, "
    "conciseness or focus.\n"
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question by "
    "an AI Assistant, without extraneous information, reflecting expert knowledge, and "
    "demonstrating a high-quality, engaging, and insightful answer.\n\n"
)

QUESTION = "Why do leaves change colour in autumn, and why are some trees brighter than others?"

RESPONSE = (
    "Leaves are green for most of the year because they are full of chlorophyll, the pigment "
    "that captures sunlight for photosynthesis. As the days shorten and nights grow cool, trees "
    "stop making new chlorophyll and break down what is left, recovering its nitrogen before the "
    "leaves fall. With the green gone, yellow and orange carotenoids, which were there all "
    "along, become visible. Red and purple colours come from anthocyanins, which some species "
    "make fresh in autumn when sugars are trapped in the leaf by sunny days and cold nights. "
    "That is why maples and sumacs can glow red after a dry, bright autumn while birches and "
    "aspens turn gold, and why a wet, cloudy season gives duller colours. Soil, drought and the "
    "health of the tree matter too: stressed trees often change early and less brightly."
)


def prompts():
    long = (
        RUBRIC
        + f"User: {QUESTION}\n<response>{RESPONSE}</response>\n\n"
        + "After examining the user's instruction and the response, briefly justify your total "
        "score in up to 100 words, then conclude with the score in the format: \"Score: N\"."
    )
    short = "Explain in three sentences how a bicycle's gears make climbing easier."
    return [long, short]


def main():
    d, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    cases = []
    for text in prompts():
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = [int(i) for i in ids]
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new = [int(t) for t in gen.sequences[0, len(ids):]]
        # The smallest gap between the chosen logit and the next one: how far greedy decoding
        # is from a tie (tsr's logits differ from these by rounding, about 1e-5).
        margins = []
        for s in gen.scores:
            top = torch.topk(s[0].double(), 2).values
            margins.append(float(top[0] - top[1]))
        cases.append({"prompt_ids": ids, "greedy": new, "min_margin": min(margins)})
    golden = {
        "made_by": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf, through tsr export-model",
        "new_tokens": NEW_TOKENS,
        "cases": cases,
    }
    with open(out, "w") as fh:
        json.dump(golden, fh, indent=1)
        fh.write("\n")
    for c in cases:
        print(f"{len(c['prompt_ids'])} prompt tokens, min margin {c['min_margin']:.4f}")


if __name__ == "__main__":
    main()
