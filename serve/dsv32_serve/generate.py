"""``dsv32-serve generate``: stream a completion to the terminal.

``--model DIR`` runs the engine in this process; ``--target HOST:PORT`` asks a
running cluster through the public gRPC API (no torch is imported then).
"""

from __future__ import annotations

import argparse
import sys


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (offline, in this process)")
    src.add_argument("--target", help="router HOST:PORT of a running cluster")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn (DeepSeek-V3.2 encoding)")
    p.add_argument("--thinking", action="store_true", help="thinking mode (with --chat)")
    p.add_argument("--session", default="", help="session id (multi-turn affinity; --target only)")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="JSON list of OpenAI tools (with --chat --target): parsed tool calls are printed")
    p.add_argument("--numerics", choices=["exact", "fp8"], default="exact")
    p.add_argument("--weight-format", choices=["fp8", "dequant"], default="fp8",
                   help="FP8 checkpoint weights kept as stored (fp8) or dequantised at load (see EngineConfig)")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.target:
        import json

        from dsv32_router.client import GenerateError, stream_responses

        messages = [{"role": "user", "content": args.prompt}] if args.chat else None
        tools = json.loads(open(args.tools).read()) if args.tools else None
        calls: dict[int, list[str]] = {}
        try:
            for msg in stream_responses(args.target, None if args.chat else args.prompt, messages=messages,
                                        thinking=args.thinking, temperature=args.temperature, top_p=args.top_p,
                                        top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed, stop=args.stop,
                                        ignore_eos=args.ignore_eos, session_id=args.session, tools=tools):
                if msg.reasoning_content:  # thinking mode: the reasoning on stderr, the answer on stdout
                    sys.stderr.write(msg.reasoning_content)
                    sys.stderr.flush()
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                for c in msg.tool_calls:
                    calls.setdefault(c.index, [c.name, ""])[1] += c.arguments
        except GenerateError as e:
            print(f"\ngenerate: {e}", file=sys.stderr)
            return 1
        sys.stdout.write("\n")
        for name, arguments in calls.values():
            print(f"tool call: {name}({arguments})")
        return 0
    from dsv32_engine.llm import LLM
    from dsv32_engine.sampling_params import SamplingParams

    llm = LLM(args.model, numerics=args.numerics, weight_format=args.weight_format)
    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                        seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    prompt = args.prompt
    if args.chat:
        from dsv32_text.encoding import render_prompt_ids

        prompt = render_prompt_ids(llm.tokenizer, [{"role": "user", "content": args.prompt}],
                                   "thinking" if args.thinking else "chat")
    for delta in llm.stream(prompt, sp):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
