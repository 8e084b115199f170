"""Does a stream continue exactly where it broke? (the check behind stream migration, README)

    python scripts/check_continuation.py [--out results.json]     (starts one vLLM worker: ~1 min)

At every chunk boundary k of a 48-token greedy answer from SmolLM2 on a real worker, compared with
the reference's own next tokens: (a) a continuation from the exact token ids (completions with a
token-id prompt: no re-tokenization, so only the engine's numerics can differ); (b) the gateway's
way, from text (chat: the text as a final partial assistant message with continue_final_message;
completions: prompt + text); (c) whether the re-sent prompt tokenizes to the original prompt ids
plus the k generated ids. Prints the boundaries where each differs.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.procs import WorkerProc, smollm2_path  # noqa: E402

MODEL, N = "smollm2", 48
CASES = (
    ("chat", "Tell me a short story about a cat."),
    ("chat", "Count from 1 to 40, separated by commas."),
    ("chat", "List the days of the week, then the months of the year, separated by commas."),
    ("completions", "Once upon a time, a cat"),
    ("completions", "1, 2, 3, 4,"),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="write every boundary's result here (JSON)")
    cli = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ichat-continuation-"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    worker = WorkerProc(tmp, smollm2_path(), MODEL, "--max-model-len", "1024")
    out = {}
    try:
        worker.wait_ready(300)
        client = httpx.Client(base_url=worker.base_url, timeout=120)

        def post(path: str, **body: object) -> dict:
            return client.post(path, json={"model": MODEL, "temperature": 0, "return_token_ids": True, **body}).json()

        def complete(prompt: object, n: int) -> tuple[list[int], dict]:
            choice = post("/v1/completions", prompt=prompt, max_tokens=n)["choices"][0]
            return choice["token_ids"], choice

        for route, question in CASES:
            messages = [{"role": "user", "content": question}]
            if route == "chat":
                answer = post("/v1/chat/completions", messages=messages, max_tokens=N)
                choice = answer["choices"][0]
                generated, prompt_ids = choice["token_ids"], answer.get("prompt_token_ids") or choice.get("prompt_token_ids")
                reference = choice["message"]["content"]
            else:
                generated, choice = complete(question, N)
                prompt_ids, reference = choice.get("prompt_token_ids"), choice["text"]
            rows = []
            for k in range(1, N):
                so_far = tokenizer.decode(generated[:k])
                from_ids, _ = complete(prompt_ids + generated[:k], N - k)
                if route == "chat":
                    answer = post(
                        "/v1/chat/completions", messages=messages + [{"role": "assistant", "content": so_far}],
                        max_tokens=N - k, continue_final_message=True, add_generation_prompt=False,
                    )  # fmt: skip
                    choice = answer["choices"][0]
                    from_text = choice["token_ids"]
                    sent_ids = answer.get("prompt_token_ids") or choice.get("prompt_token_ids")
                    same_ids = sent_ids == prompt_ids + generated[:k] if sent_ids else None
                else:
                    from_text, _ = complete(question + so_far, N - k)
                    same_ids = tokenizer(question + so_far)["input_ids"] == prompt_ids + generated[:k]
                rows.append({"k": k, "ids_ok": from_ids == generated[k:], "text_ok": from_text == generated[k:],
                             "retokenizes_same": same_ids, "tail": so_far[-15:]})  # fmt: skip
            result = {
                "boundaries": len(rows),
                "ids_mismatch": [r["k"] for r in rows if not r["ids_ok"]],
                "text_mismatch": [r["k"] for r in rows if not r["text_ok"]],
                "retokenize_differs": [r["k"] for r in rows if r["retokenizes_same"] is False],
            }
            print(route, repr(question), repr(reference[:60]), result, flush=True)
            out[f"{route}: {question}"] = {**result, "reference": reference, "rows_bad": [r for r in rows if not (r["ids_ok"] and r["text_ok"])]}
        if cli.out:
            cli.out.write_text(json.dumps(out, indent=1))
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
