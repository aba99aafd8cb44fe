"""``dsv32-serve chat``: an interactive multi-turn chat with the DeepSeek-V3.2 encoding (offline)."""

from __future__ import annotations

import argparse
import sys

from .generate import add_sampling_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--thinking", action="store_true", help="thinking mode")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    from dsv32_text.encoding import parse_message_from_completion_text, render_prompt_ids
    from dsv32_engine.llm import LLM
    from dsv32_engine.sampling_params import SamplingParams

    llm = LLM(args.model)
    mode = "thinking" if args.thinking else "chat"
    messages = [{"role": "system", "content": args.system}] if args.system else []
    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                        seed=args.seed, stop=args.stop)
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), None):
        line = line.strip()
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = render_prompt_ids(llm.tokenizer, messages, mode)
        out = llm.generate([ids], sp)[0].outputs[0]
        raw = llm.tokenizer.decode(out.token_ids, skip_special_tokens=False)
        try:
            msg = parse_message_from_completion_text(raw, mode)
        except ValueError:  # random or truncated output: keep the raw text as the answer
            msg = {"role": "assistant", "content": out.text, "reasoning_content": ""}
        if msg.get("reasoning_content"):
            print(f"[thinking] {msg['reasoning_content']}")
        print(f"assistant> {msg['content']}")
        messages.append({"role": "assistant", "content": msg["content"],
                         "reasoning_content": msg.get("reasoning_content") or ""})
    return 0
