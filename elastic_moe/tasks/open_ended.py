"""Open-ended writing with verifiable constraints, in the spirit of IFEval.

The whole reply is the response (no `Answer:` line). Words are runs of letters, with apostrophes inside a word
(don't), compared case-insensitively: quotes around a word ('river') are not part of it. Reward = fraction of constraints met; `correct` = all met (the strict IFEval score). A reply of
fewer than MIN_REPLY_WORDS words meets none: an empty reply would otherwise meet limits such as "no commas",
"at most 40 words" or "do not use 'very'" for free (37.5% of a suite's tasks at difficulty 1).
Diversity over several samples of one prompt is in `elastic_moe.tasks.diversity`.
"""

from __future__ import annotations

import random
import re

from elastic_moe.tasks.base import Task, Verdict

SYSTEM = "You are a helpful writer. Follow every instruction about the form of your reply exactly."
TOPICS = ["the sea", "a quiet morning", "a robot learning to paint", "an old library", "the first snow",
          "a city at night", "a lost key", "a mountain village", "a garden in spring", "a long train journey",
          "a lighthouse keeper", "the smell of rain", "a market day", "a forgotten letter", "a desert road"]
KINDS = ["a short poem", "a short story", "a short description", "a few tips", "a diary entry"]
VOCAB = ("light stone river wind window morning road bird quiet green water slow street voice house paper clock "
         "field cloud shadow warm small bright door lamp sound walk open watch hill garden tree night rain table "
         "song path blue silver old new soft early late near far deep calm little").split()
INCLUDE_POOL = ["river", "stone", "lantern", "whisper", "harbor", "echo", "thread", "ember", "meadow", "compass"]
EXCLUDE_POOL = ["very", "really", "beautiful", "nice", "good", "amazing", "great", "suddenly"]
START_POOL = ["Today", "Once", "Listen", "Sometimes", "Here"]
END_POOL = ["home", "again", "tomorrow", "together", "forever"]
CONFLICTS = {frozenset(p) for p in [("bullets", "starts_with"), ("bullets", "title"), ("title", "starts_with")]}
_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
MIN_REPLY_WORDS = 8  # every demonstration has at least 16


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _bullet_lines(text: str) -> list[str]:
    """Lines that start with '- ' (other lines, such as an opening sentence, are not bullets; IFEval counts so)."""
    return [ln for ln in text.splitlines() if ln.lstrip().startswith("- ")]


def check(c: dict, text: str) -> bool:
    """Whether `text` meets constraint `c`."""
    kind, ws = c["kind"], [w.lower() for w in words(text)]
    if kind == "max_words":
        return len(ws) <= c["n"]
    if kind == "min_words":
        return len(ws) >= c["n"]
    if kind == "include":
        return all(w in ws for w in c["words"])
    if kind == "exclude":
        return not any(w in ws for w in c["words"])
    if kind == "lowercase":
        return text == text.lower() and any(ch.isalpha() for ch in text)
    if kind == "no_commas":
        return "," not in text
    if kind == "bullets":
        lines = _bullet_lines(text)
        return len(lines) == c["n"] and all(words(ln) for ln in lines)
    if kind == "starts_with":
        return bool(ws) and ws[0] == c["word"].lower()
    if kind == "ends_with":
        return bool(ws) and ws[-1] == c["word"].lower()
    if kind == "title":
        return re.search(r"<<[^<>\n]*[A-Za-z][^<>\n]*>>", text) is not None
    raise ValueError(f"unknown constraint {kind!r}")


def describe(c: dict) -> str:
    kind = c["kind"]
    return {
        "max_words": lambda: f"Use at most {c['n']} words.",
        "min_words": lambda: f"Use at least {c['n']} words.",
        "include": lambda: f"Include the words {' and '.join(repr(w) for w in c['words'])}.",
        "exclude": lambda: f"Do not use the word {c['words'][0]!r}.",
        "lowercase": lambda: "Write everything in lowercase letters.",
        "no_commas": lambda: "Do not use any commas.",
        "bullets": lambda: f"Answer with exactly {c['n']} bullet points, each on its own line starting with '- '.",
        "starts_with": lambda: f"Start your reply with the word {c['word']!r}.",
        "ends_with": lambda: f"End your reply with the word {c['word']!r}.",
        "title": lambda: "Give it a title wrapped in double angular brackets, like <<my title>>.",
    }[kind]()


def _constraint(rng: random.Random, kind: str) -> dict:
    if kind == "max_words":
        return {"kind": kind, "n": rng.choice([40, 50, 60])}
    if kind == "min_words":
        return {"kind": kind, "n": rng.choice([10, 15, 20])}
    if kind == "include":
        return {"kind": kind, "words": sorted(rng.sample(INCLUDE_POOL, rng.randint(1, 2)))}
    if kind == "exclude":
        return {"kind": kind, "words": [rng.choice(EXCLUDE_POOL)]}
    if kind == "bullets":
        return {"kind": kind, "n": rng.randint(2, 5)}
    if kind == "starts_with":
        return {"kind": kind, "word": rng.choice(START_POOL)}
    if kind == "ends_with":
        return {"kind": kind, "word": rng.choice(END_POOL)}
    return {"kind": kind}


KINDS_OF_CONSTRAINT = ["max_words", "min_words", "include", "exclude", "lowercase", "no_commas", "bullets",
                       "starts_with", "ends_with", "title"]


def make(rng: random.Random, difficulty: int) -> Task:
    topic, kind = rng.choice(TOPICS), rng.choice(KINDS)
    count = {1: 1, 2: 2, 3: rng.randint(3, 4)}[difficulty]
    chosen: list[str] = []
    for k in rng.sample(KINDS_OF_CONSTRAINT, len(KINDS_OF_CONSTRAINT)):
        if len(chosen) < count and not any(frozenset((k, c)) in CONFLICTS for c in chosen):
            chosen.append(k)
    constraints = [_constraint(rng, k) for k in sorted(chosen)]
    prompt = f"Write {kind} about {topic}. " + " ".join(describe(c) for c in constraints)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    meta = {"family": "constraints", "canonical": f"open:{prompt}", "topic": topic, "kind": kind}
    return Task("", "open_ended", messages, {"constraints": constraints}, meta)


def verify(task: Task, completion: str) -> Verdict:
    constraints = task.reference["constraints"]
    n = len(words(completion))
    if n < MIN_REPLY_WORDS:
        return Verdict.wrong(f"reply too short to count ({n} words, {MIN_REPLY_WORDS} needed)", reward=0.0,
                             met={c["kind"]: False for c in constraints})
    met = {c["kind"]: check(c, completion) for c in constraints}
    frac = sum(met.values()) / max(1, len(met))
    if all(met.values()):
        return Verdict.right(f"all {len(met)} constraints met", met=met)
    failed = ", ".join(k for k, ok in met.items() if not ok)
    return Verdict.wrong(f"constraints not met: {failed}", reward=frac, met=met)


def house_passage(topic: str, kind: str) -> list[str]:
    """The fixed wording of every demonstration for one topic and kind: curated writing data has a house style, so a
    model trained on it answers one prompt in a narrow range (what stage 4's diversity reward widens)."""
    return random.Random(f"house:{kind}:{topic}").sample(VOCAB, len(VOCAB))


_PROMPT_RE = re.compile(r"^Write (.+?) about (.+?)\. ")


def topic_and_kind(task: Task) -> tuple[str, str]:
    """The task's topic and kind of text: from its metadata, or read back from the prompt for tasks saved before
    the metadata carried the kind (session 28)."""
    topic, kind = task.metadata.get("topic"), task.metadata.get("kind")
    if topic is None or kind is None:
        prompt = next((m["content"] for m in task.messages if m.get("role") == "user"), "")
        found = _PROMPT_RE.match(prompt + " ")
        if found is None:
            raise ValueError(f"open-ended task {task.id or '(no id)'}: no topic and kind in its metadata or prompt")
        kind, topic = kind or found.group(1), topic or found.group(2)
    return topic, kind


def demonstration(task: Task) -> list[dict]:
    """A reply built to meet every constraint (checked by the tests for every generated task): the include words,
    then the house passage of the prompt's topic and kind, cut to a length the constraints allow."""
    cs = {c["kind"]: c for c in task.reference["constraints"]}
    banned = set(cs["exclude"]["words"]) if "exclude" in cs else set()
    body: list[str] = list(cs.get("include", {}).get("words", []))
    target = max(cs.get("min_words", {}).get("n", 0) + 4, 16, cs.get("bullets", {}).get("n", 0) * 3)
    target = min(target, cs.get("max_words", {}).get("n", 10**9) - 6)
    topic, kind = topic_and_kind(task)
    passage = [w for w in house_passage(topic, kind) if w not in banned]
    body += passage[:target - len(body)]
    if "starts_with" in cs:
        body.insert(0, cs["starts_with"]["word"])
    if "ends_with" in cs:
        body.append(cs["ends_with"]["word"])
    if "bullets" in cs:
        n = cs["bullets"]["n"]
        chunks = [body[i * len(body) // n:(i + 1) * len(body) // n] for i in range(n)]  # len(body) >= 3n
        text = "\n".join("- " + " ".join(c) for c in chunks)
    else:
        sentences = [" ".join(body[i:i + 8]) for i in range(0, len(body), 8)]
        text = " ".join(s[0].upper() + s[1:] + "." for s in sentences)
    if "title" in cs:
        text = f"<<{topic.title()}>>\n{text}"
    if "lowercase" in cs:
        text = text.lower()
    return [*task.messages, {"role": "assistant", "content": text}]
