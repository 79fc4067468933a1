#!/usr/bin/env python3
"""The request bodies alpaca_eval 0.6.6 itself sends for its default annotator
(`weighted_alpaca_eval_gpt4_turbo`), for tsr's API judge to compare its own with
(steps/tests/alpaca_agreement.rs). alpaca_eval's `PairwiseAnnotator` annotates a few pairs
through the openai client against a recorder on loopback (OPENAI_API_BASE), which keeps each
request body and answers with a chat completion carrying top log-probabilities. Writes
tests/fixtures/eval/alpaca-requests.json: the template, and per pair its instruction, the
baseline's output (output_1), the model's (output_2), the body sent and the preference
alpaca_eval read from the answer.

    py=$(scripts/golden-venv.sh eval scripts/requirements-eval-golden.txt)
    "$py" scripts/alpaca_request_golden.py
"""
import http.server
import json
import math
import os
import pathlib
import threading
import warnings

warnings.filterwarnings("ignore")

PAIRS = [
    ("What is the capital of France?", "Paris.", "The capital of France is Paris, on the Seine."),
    ("Write a haiku about autumn leaves.", "Leaves fall.", "Crimson leaves drifting\nwhispers on the cooling wind\nthe year lets them go"),
    ("Résumé 解释 🙂 {output_1}", "{\"json\": {}} with braces", "  padded  \n"),
    ("Give three uses of \"quotes\" and a \\ backslash.", "1. a\n2. b\n3. c", "None."),
    ("Translate 'good morning' to German.", "Guten Morgen.", "Guten Morgen!"),
    ("Name a prime number larger than 10.", "11", "13 is prime."),
]

bodies = []


class Recorder(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        bodies.append(body)
        # The shown-first output (`m`) preferred with probability 0.7.
        top = [{"token": "m", "logprob": math.log(0.7), "bytes": None},
               {"token": "M", "logprob": math.log(0.3), "bytes": None}]
        answer = {
            "id": f"chatcmpl-{len(bodies)}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "m"},
                         "logprobs": {"content": [{"token": "m", "logprob": math.log(0.7), "bytes": None,
                                                   "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["OPENAI_API_BASE"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    os.environ["OPENAI_API_KEY"] = "sk-recorder"
    from alpaca_eval import annotators, utils

    annotator = annotators.PairwiseAnnotator(
        annotators_config="weighted_alpaca_eval_gpt4_turbo", caching_path=None, is_avoid_reannotations=False
    )
    template_path = (
        pathlib.Path(annotators.__file__).parent.parent
        / "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
    )
    rows = []
    for instruction, baseline, model in PAIRS:
        before = len(bodies)
        [ann] = annotator.annotate_pairs(
            [{"instruction": instruction, "output_1": baseline, "output_2": model}]
        )
        assert len(bodies) == before + 1, "one request per pair"
        rows.append(
            {
                "instruction": instruction,
                "output_1": baseline,
                "output_2": model,
                "body": bodies[-1],
                "preference": ann["preference"],
            }
        )
    server.shutdown()
    out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/eval/alpaca-requests.json"
    doc = {
        "alpaca_eval": utils.get_package_version("alpaca_eval"),
        "template": template_path.read_text(),
        "pairs": rows,
    }
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"{out}: {len(rows)} request bodies")


if __name__ == "__main__":
    main()
