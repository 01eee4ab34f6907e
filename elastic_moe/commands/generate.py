"""`elastic-moe generate CKPT --prompt TEXT [--layers N --experts M --top-k K]`, or `--chat` for a conversation.

Chat mode reads one user turn per line from stdin and keeps the whole conversation in the shared chat format
(elastic_moe.chat). Commands: `/topk K` (top-k for the following requests; `/topk` alone: back to the spec's),
`/topk K text` (send `text` with top-k K for that request only), `/reset`, `/help`, `/quit`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from elastic_moe.commands import arg_types as types
from elastic_moe.commands.export import add_spec_arguments, spec_from_args

HELP = "sample from a (sub-)model: completions of --prompt texts, or an interactive chat with --chat"
ROLE_STOPS = ("<|user|>", "<|system|>", "<|tool|>", "<|assistant|>")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint folder or run directory (its latest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="chat: user turns from stdin (with --prompt: one turn each)")
    p.add_argument("--system", help="system message for --chat")
    add_spec_arguments(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=types.finite_float, default=0.8, help="0: greedy (default 0.8)")
    g.add_argument("--top-p", type=types.finite_float, default=0.95)
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens per completion (default 128)")
    g.add_argument("--seed", type=types.seed, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", type=types.device, default="auto")


def run(args) -> int:
    import torch

    from elastic_moe.checkpoint import load_checkpoint
    from elastic_moe.errors import UserError
    from elastic_moe.generate import SamplingParams
    from elastic_moe.tokenizer import Tokenizer

    if not args.prompt and not args.chat:
        raise UserError("give --prompt TEXT (repeatable) or --chat")
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")
    if not all(_is_utf8(p) for p in args.prompt):
        raise UserError("--prompt is not valid UTF-8 text")
    if any(s == "" for s in args.stop):
        raise UserError("--stop '' would stop before the first token: give a non-empty stop string")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model, meta = load_checkpoint(args.ckpt, device)
    model.eval()
    tok_dir = Path(meta["path"]) / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"{meta['path']} has no tokenizer/ folder: cannot turn text into tokens")
    tok = Tokenizer.load(tok_dir)
    spec = spec_from_args(args)
    model.resolve(spec)  # a bad spec fails here, before any prompt is read
    if args.max_tokens >= model.cfg.max_position_embeddings:
        raise UserError(f"--max-tokens {args.max_tokens} leaves no room for a prompt in the model's context of "
                        f"{model.cfg.max_position_embeddings} tokens")
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop_strings=tuple(args.stop), seed=args.seed)
    if args.chat:
        lines = args.prompt or None
        if lines is None and hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="surrogateescape")  # undecodable bytes: a line skipped, not a traceback
        return chat_loop(model, tok, spec, params, args.system, sys.stdin if lines is None else iter(lines))
    return complete(model, tok, spec, params, args.prompt)


def _is_utf8(text: str) -> bool:
    """False for text holding the lone surrogates Python decodes undecodable argv / stdin bytes to."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def complete(model, tok, spec, params, prompts: list[str]) -> int:
    from elastic_moe.generate import generate

    ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    t0 = time.perf_counter()
    outs = generate(model, ids, params, spec, eos_id=tok.eos_id, decode=tok.decode)
    dt = time.perf_counter() - t0
    for n, (p, o) in enumerate(zip(prompts, outs)):
        if len(prompts) > 1:
            print(f"--- completion {n + 1} ({o.finish_reason}) ---")
        print(p + _text(tok, o.tokens, params.stop_strings))
    total = sum(len(o.tokens) for o in outs)
    print(f"[{total} tokens in {dt:.2f} s, {total / dt:.1f} tokens/s; {spec.describe()}]", file=sys.stderr)
    return 0


def _text(tok, tokens: list[int], stops: tuple[str, ...]) -> str:
    ids = [t for t in tokens if t != tok.eos_id]
    text = tok.decode(ids)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def chat_loop(model, tok, spec, params, system: str | None, lines) -> int:
    """One user turn per line; the reply is printed as `assistant: ...`."""
    from elastic_moe.errors import UserError
    from elastic_moe.generate import generate

    interactive = lines is sys.stdin and sys.stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    top_k = None  # None: the spec's own
    params = dataclasses.replace(params, stop_strings=tuple(params.stop_strings) + ROLE_STOPS)
    limit = model.cfg.max_position_embeddings
    if interactive:
        print("chat: one turn per line; /topk K, /reset, /quit", file=sys.stderr)
    it = iter(lines)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = next(it, None)
        if line is None:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if not _is_utf8(text):
            print("(that line is not valid UTF-8 text: skipped)")
            continue
        k_now = top_k
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                messages = list(base)
                print("(conversation cleared)")
                continue
            if cmd == "/help":
                print("/topk K: top-k for the next requests; /topk: the spec's; /topk K text: this request only; "
                      "/reset; /quit")
                continue
            if cmd != "/topk":
                print(f"(unknown command {cmd}; /help)")
                continue
            k_text, _, msg = rest.strip().partition(" ")
            try:
                k = int(k_text) if k_text else None
                if k is not None:
                    model.resolve(dataclasses.replace(spec, top_k=k))
            except (ValueError, UserError) as e:
                print(f"(bad top-k {k_text!r}: {e})")
                continue
            if not msg.strip():
                top_k = k
                print(f"(top-k {k if k is not None else 'of the spec'} for the next requests)")
                continue
            k_now, text = k, msg.strip()
        messages.append({"role": "user", "content": text})
        ids = tok.encode_chat(messages, add_generation_prompt=True)
        while len(ids) + params.max_new_tokens > limit and len(messages) > len(base) + 1:
            del messages[len(base)]  # the oldest turn leaves the context
            ids = tok.encode_chat(messages, add_generation_prompt=True)
        if len(ids) + params.max_new_tokens > limit:
            messages.pop()
            print(f"(the message is too long for the context of {limit} tokens)")
            continue
        req_spec = spec if k_now is None else dataclasses.replace(spec, top_k=k_now)
        out = generate(model, [ids], params, req_spec, eos_id=tok.eos_id, decode=tok.decode)[0]
        reply = _text(tok, out.tokens, params.stop_strings).strip()
        messages.append({"role": "assistant", "content": reply})
        print(f"assistant: {reply}", flush=True)
    return 0
