"""The one chat format of this project, shared by the tokenizer, the task suites, SFT, rollout and export.

    <s><|system|>\n{system}</s><|user|>\n{user}</s><|assistant|>\n{assistant}</s><|tool|>\n{tool result}</s>...

An assistant turn ends with the end-of-sequence token `</s>`, so generation stops there. `CHAT_TEMPLATE` is the
same format as a Jinja template, written into `tokenizer_config.json` so transformers' `apply_chat_template`
produces exactly what `render` produces.
"""

from __future__ import annotations

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "tool": "<|tool|>"}
# Order fixes the ids: <pad>=0, <s>=1, </s>=2 match ModelConfig's pad/bos/eos defaults.
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Python twin of CHAT_TEMPLATE."""
    parts = [BOS]
    for m in messages:
        role = m["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown chat role {role!r} (known: {', '.join(ROLE_TOKENS)})")
        parts.append(f"{ROLE_TOKENS[role]}\n{m['content']}{EOS}")
    if add_generation_prompt:
        parts.append(f"{ROLE_TOKENS['assistant']}\n")
    return "".join(parts)
