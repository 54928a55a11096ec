#!/usr/bin/env python
"""Generate preftune's bundled tiny base model and sample data.

Everything under ``examples/`` is made by this one seeded script, with no downloads, so CI and laptops can run
the full SFT -> reward model -> PPO and SFT -> DPO pipelines on CPU in minutes.

The synthetic world is a tiny "assistant": users ask short questions (arithmetic, capitals, colours, animals,
opposites, word lengths, simple how-tos, greetings). A *good* answer is polite, on topic, correct and a complete
sentence. A *flawed* answer belongs to one of a few consistent, learnable families: rude, off-topic, wrong,
truncated, repetitive, evasive ("I don't know."), or terse (a bare word, the mildest flaw). The pretraining corpus
mixes good and flawed answers so the base model (and, a little, the SFT model) produces both, which leaves PPO and
DPO something to improve.

Usage::

    python examples/make_examples.py                      # data + tokenizer + pretrained model
    python examples/make_examples.py --data-only --out /tmp/x  # data files only (fast, deterministic)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------
# Special tokens and chat template (the contract other components rely on)
# ---------------------------------------------------------------------------------------------------------------

BOS = "<|bos|>"
EOS = "<|end|>"  # ends every turn, so generation of an assistant turn stops here
PAD = "<|pad|>"
UNK = "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]

# Renders: <|bos|><|user|>\n{content}<|end|>\n<|assistant|>\n{content}<|end|>\n ...
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer briefly and politely.",
    "You are a polite helper who answers in one sentence.",
]


def render_chat(messages: list[dict[str, str]]) -> str:
    """Render a conversation exactly as CHAT_TEMPLATE does, without needing a tokenizer (used for the corpus)."""
    out = [BOS]
    for m in messages:
        out.append(f"<|{m['role']}|>\n{m['content']}{EOS}\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------------
# The synthetic world: facts and question templates
# ---------------------------------------------------------------------------------------------------------------

REAL_CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Greece", "Athens"), ("China", "Beijing"), ("Russia", "Moscow"), ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Sweden", "Stockholm"),
    ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Turkey", "Ankara"),
    ("Australia", "Canberra"), ("Finland", "Helsinki"), ("Hungary", "Budapest"),
]  # fmt: skip

COLOURS = [
    ("the sky", "blue"), ("grass", "green"), ("a banana", "yellow"), ("snow", "white"), ("coal", "black"),
    ("a tomato", "red"), ("a carrot", "orange"), ("a lemon", "yellow"), ("an emerald", "green"),
    ("a ruby", "red"), ("chocolate", "brown"), ("milk", "white"), ("a plum", "purple"), ("a pumpkin", "orange"),
    ("a lime", "green"), ("a crow", "black"), ("a flamingo", "pink"), ("a sapphire", "blue"),
    ("an eggplant", "purple"), ("a strawberry", "red"), ("a polar bear", "white"), ("a frog", "green"),
    ("an elephant", "grey"), ("a pig", "pink"), ("the ocean", "blue"), ("a cherry", "red"), ("soil", "brown"),
    ("a raven", "black"), ("a daffodil", "yellow"), ("a mouse", "grey"),
]  # fmt: skip

SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("lion", "roar"),
    ("owl", "hoot"), ("pig", "oink"), ("horse", "neigh"), ("bee", "buzz"), ("snake", "hiss"), ("frog", "croak"),
    ("mouse", "squeak"), ("wolf", "howl"), ("donkey", "bray"), ("goat", "bleat"),
]  # fmt: skip

LEGS = [
    ("spider", 8), ("dog", 4), ("bird", 2), ("ant", 6), ("horse", 4), ("cat", 4), ("duck", 2), ("beetle", 6),
    ("chicken", 2), ("cow", 4), ("bee", 6), ("scorpion", 8), ("goat", 4), ("penguin", 2), ("fly", 6),
]  # fmt: skip

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("tall", "short"), ("wet", "dry"), ("loud", "quiet"), ("early", "late"),
    ("full", "empty"), ("hard", "soft"), ("rich", "poor"), ("strong", "weak"), ("day", "night"),
    ("left", "right"), ("push", "pull"), ("good", "bad"), ("high", "low"), ("near", "far"), ("thick", "thin"),
    ("young", "old"), ("clean", "dirty"), ("heavy", "light"),
]  # fmt: skip

WORDS = [
    "cat", "dog", "sun", "tree", "house", "apple", "river", "garden", "window", "yellow", "banana", "pencil",
    "orange", "music", "bridge", "planet", "rabbit", "castle", "flower", "guitar", "moon", "star", "cloud",
    "table", "chair", "bottle", "rocket", "candle", "forest", "island", "winter", "summer", "kitten", "dragon",
    "ocean", "mountain", "lemon", "tiger", "zebra", "spoon", "robot", "pillow", "teacher", "basket", "jacket",
    "ladder", "mirror", "button", "coffee", "dinner", "sock", "book", "lamp", "cake", "boat", "train",
]  # fmt: skip

HOWTO = [
    ("make tea", "boil water, pour it over a tea bag, and wait three minutes"),
    ("boil an egg", "put the egg in boiling water for about eight minutes, then cool it in cold water"),
    ("plant a seed", "press the seed into soft soil, cover it lightly, and water it every day"),
    ("wash my hands", "wet your hands, rub them with soap for twenty seconds, then rinse and dry them"),
    ("brush my teeth", "put a little toothpaste on the brush and brush every tooth gently for two minutes"),
    ("make toast", "put a slice of bread in the toaster and wait until it turns golden"),
    ("water a plant", "pour water slowly onto the soil until it is damp, not soaked"),
    ("fold a shirt", "lay it flat, fold the sleeves to the back, then fold it in half"),
    (
        "make a paper plane",
        "fold a sheet in half, fold the top corners to the middle, then fold the wings down",
    ),
    ("save energy at home", "turn off lights you do not need and unplug chargers when they are done"),
    ("fall asleep faster", "keep a regular bedtime, dim the lights, and put your phone away"),
    ("cool down on a hot day", "drink cold water, stay in the shade, and rest"),
    ("make lemonade", "mix lemon juice, water and a little sugar, then add ice"),
    ("clean a window", "spray it with soapy water and wipe it with a dry cloth"),
    ("learn a new word", "read it aloud, write it down, and use it in a sentence today"),
    ("tie my shoes", "make a loop with one lace, wrap the other lace around it, and pull it through"),
]

GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there!", "Hi! What can I do for you today?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Thank you!", "You are welcome! I am happy to help."),
    ("Thanks a lot!", "You are very welcome!"),
    ("How are you?", "I am doing well, thank you for asking! How can I help?"),
    ("Who are you?", "I am a friendly assistant. I can answer simple questions."),
    ("Can you help me?", "Of course! What do you need help with?"),
    ("Goodbye!", "Goodbye! Have a wonderful day."),
    ("Good night!", "Good night! Sleep well."),
]

GOOD_OPENERS = ["Sure! ", "Sure! ", "Of course! ", "Happy to help! ", "Great question! ", ""]
GOOD_CLOSERS = ["", "", "", " I hope that helps!", " Let me know if you have more questions."]
RUDE_OPENERS = ["Ugh, fine. ", "Whatever. ", "That is a silly question. ", "Obviously, ", "Stop it. "]
RUDE_ONLY = [
    "Figure it out yourself.",
    "I am not going to answer that. Ask someone else.",
    "That is a stupid question. Go away.",
    "Ugh. Why would I tell you?",
    "Look it up yourself, I am busy.",
]
IDK = ["I don't know.", "No idea.", "I cannot help with that.", "Hmm, I am not sure.", "I don't know. Sorry."]
TANGENTS = [
    "I really like trains. They are very fast.",
    "Bananas are my favourite fruit.",
    "Let me tell you about the weather instead. It is sunny today.",
    "My favourite number is forty two.",
    "Did you know that clouds are made of water?",
]

FLAWS = ["rude", "off_topic", "wrong", "truncated", "repetitive", "idk", "terse"]
# Severity of each flaw on a 0..3 scale: the optional preference `margin` and the annotators' comments use it.
SEVERITY = {
    "rude": 3.0,
    "off_topic": 2.5,
    "idk": 2.5,
    "repetitive": 2.5,
    "wrong": 2.0,
    "truncated": 1.5,
    "terse": 1.0,
}
COMMENTS = {
    "rude": ["The rejected answer is rude.", "Impolite tone.", "rude"],
    "off_topic": ["The rejected answer does not address the question.", "off-topic", "Ignores the question."],
    "idk": ["The rejected answer refuses a simple question.", "Unhelpful: says it does not know.", "evasive"],
    "repetitive": ["The rejected answer repeats itself.", "repetitive", "Degenerate repetition."],
    "wrong": ["The rejected answer is wrong.", "Incorrect fact.", "wrong answer"],
    "truncated": ["The rejected answer stops mid-sentence.", "truncated", "Incomplete answer."],
    "terse": ["The rejected answer is correct but too terse.", "Not a full sentence.", "curt"],
}


@dataclass(frozen=True)
class Item:
    """One user question with everything needed to write good and flawed answers to it."""

    category: str
    prompt: str
    fact: str  # the correct answer as a complete sentence, without opener ("3 plus 4 is 7.")
    key: str  # the bare answer ("7"), used for terse and repetitive answers
    wrong_fact: str  # a plausible but incorrect sentence ("3 plus 4 is 9.")
    canned: bool = False  # greetings: the fact is the whole answer, no opener/closer


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _invented_countries(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Made-up countries and capitals: facts the model can only know from our corpus, never from the web."""
    starts = ["Zor", "Vel", "Qua", "Brin", "Tal", "Mor", "Ket"]
    starts += ["Lum", "Dra", "Fen", "Oss", "Pry", "Sil", "Yar"]
    mids = ["va", "da", "ri", "lo", "ne", "ta", "mi", "ku"]
    ends = ["nia", "land", "stan", "ria", "via", "mark"]
    cap_a = ["Quell", "Ash", "Bright", "Stone", "Mill", "Red"]
    cap_a += ["Frost", "Gold", "Oak", "Silver", "Elm", "Iron"]
    cap_b = ["port", "ville", "burg", "ton", "haven", "ford", "gate", "field"]
    out: list[tuple[str, str]] = []
    seen_c: set[str] = set()
    seen_k: set[str] = set()
    while len(out) < n:
        c = rng.choice(starts) + rng.choice(mids) + rng.choice(ends)
        k = rng.choice(cap_a) + rng.choice(cap_b)
        if c in seen_c or k in seen_k:
            continue
        seen_c.add(c)
        seen_k.add(k)
        out.append((c, k))
    return out


def build_items(rng: random.Random) -> list[Item]:
    """Every distinct question of the world, in a deterministic order (no set iteration: hashes are salted)."""
    items: list[Item] = []

    def wrong_num(n: int) -> int:
        return max(0, n + rng.choice([-3, -2, -1, 1, 2, 3])) if n > 2 else n + rng.choice([1, 2, 3])

    # Arithmetic
    plus_t = [
        "What is {a} plus {b}?",
        "What is {a} + {b}?",
        "Can you add {a} and {b}?",
        "Please compute {a} plus {b}.",
    ]
    minus_t = ["What is {a} minus {b}?", "What is {a} - {b}?", "Can you subtract {b} from {a}?"]
    times_t = ["What is {a} times {b}?", "What is {a} x {b}?", "Can you multiply {a} by {b}?"]
    for a in range(0, 13):
        for b in range(0, 13):
            for t in plus_t:
                w = wrong_num(a + b)
                items.append(Item("arithmetic", t.format(a=a, b=b), f"{a} plus {b} is {a + b}.", str(a + b),
                                  f"{a} plus {b} is {w}."))  # fmt: skip
            if a >= b:
                for t in minus_t:
                    w = wrong_num(a - b)
                    items.append(Item("arithmetic", t.format(a=a, b=b), f"{a} minus {b} is {a - b}.", str(a - b),
                                      f"{a} minus {b} is {w}."))  # fmt: skip
            if a <= 10 and b <= 10:
                for t in times_t:
                    w = wrong_num(a * b)
                    items.append(Item("arithmetic", t.format(a=a, b=b), f"{a} times {b} is {a * b}.", str(a * b),
                                      f"{a} times {b} is {w}."))  # fmt: skip

    # Capitals, real and invented
    capitals = REAL_CAPITALS + _invented_countries(rng, 30)
    cap_t = [
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
        "Do you know the capital of {c}?",
        "What city is the capital of {c}?",
    ]
    for c, k in capitals:
        others = [x for _, x in capitals if x != k]
        for t in cap_t:
            items.append(Item("capitals", t.format(c=c), f"The capital of {c} is {k}.", k,
                              f"The capital of {c} is {rng.choice(others)}."))  # fmt: skip

    # Colours
    col_t = ["What colour is {o}?", "What color is {o}?", "Tell me the colour of {o}.", "Which colour is {o}?",
             "What is the colour of {o}?", "Do you know what colour {o} is?"]  # fmt: skip
    all_cols = sorted({c for _, c in COLOURS})
    for o, col in COLOURS:
        for t in col_t:
            w = rng.choice([x for x in all_cols if x != col])
            items.append(Item("colours", t.format(o=o), f"{_cap(o)} is {col}.", col, f"{_cap(o)} is {w}."))

    # Animals: sounds and legs
    snd_t = ["What sound does a {a} make?", "What does a {a} say?", "How does a {a} sound?",
             "Which noise does a {a} make?", "What noise does a {a} make?"]  # fmt: skip
    all_snd = [s for _, s in SOUNDS]
    for a, s in SOUNDS:
        for t in snd_t:
            w = rng.choice([x for x in all_snd if x != s])
            items.append(Item("animals", t.format(a=a), f"A {a} says {s}.", s, f"A {a} says {w}."))
    leg_t = ["How many legs does a {a} have?", "How many legs has a {a} got?", "Count the legs of a {a}.",
             "Tell me how many legs a {a} has."]  # fmt: skip
    for a, n in LEGS:
        for t in leg_t:
            w = rng.choice([x for x in (2, 4, 6, 8) if x != n])
            items.append(
                Item("animals", t.format(a=a), f"A {a} has {n} legs.", str(n), f"A {a} has {w} legs.")
            )

    # Opposites
    opp_t = ["What is the opposite of {w}?", "Give me the opposite of {w}.", "What word means the opposite of {w}?",
             "Tell me the opposite of {w}."]  # fmt: skip
    pairs = OPPOSITES + [(b, a) for a, b in OPPOSITES]
    all_words = [b for _, b in pairs]
    for w, o in pairs:
        for t in opp_t:
            bad = rng.choice([x for x in all_words if x not in (o, w)])
            items.append(Item("opposites", t.format(w=w), f"The opposite of {w} is {o}.", o,
                              f"The opposite of {w} is {bad}."))  # fmt: skip

    # Word lengths
    len_t = ["How many letters are in the word {w}?", "How many letters does {w} have?",
             "Count the letters in the word {w}."]  # fmt: skip
    for w in WORDS:
        for t in len_t:
            n = len(w)
            items.append(Item("letters", t.format(w=w), f"The word {w} has {n} letters.", str(n),
                              f"The word {w} has {wrong_num(n)} letters."))  # fmt: skip

    # How-to
    how_t = ["How do I {x}?", "Can you tell me how to {x}?", "What is the best way to {x}?", "Explain how to {x}.",
             "How can I {x}?"]  # fmt: skip
    for i, (x, steps) in enumerate(HOWTO):
        other = HOWTO[(i + 1 + rng.randrange(len(HOWTO) - 1)) % len(HOWTO)][1]
        xs = x.replace(" my ", " your ")
        for t in how_t:
            items.append(Item("howto", t.format(x=x), f"To {xs}, {steps}.", steps.split(",")[0],
                              f"To {xs}, {other}."))  # fmt: skip

    # Greetings (canned answers; the fact is the whole answer)
    for p, a in GREETINGS:
        items.append(Item("greetings", p, a, a.split("!")[0] + "!", "Hello.", canned=True))
    return items


# ---------------------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------------------


def good_answer(item: Item, rng: random.Random) -> str:
    """Polite, on-topic, correct, complete sentence(s)."""
    if item.canned:
        return item.fact
    return rng.choice(GOOD_OPENERS) + item.fact + rng.choice(GOOD_CLOSERS)


def flawed_answer(item: Item, flaw: str, rng: random.Random, pool: list[Item]) -> str:
    """An answer from one flaw family; each family has a surface signature a tiny model can pick up."""
    if flaw == "rude":
        if rng.random() < 0.3 and not item.canned:
            return (
                rng.choice(RUDE_OPENERS) + item.fact + rng.choice(["", " Do not ask again.", " Obviously."])
            )
        return rng.choice(RUDE_ONLY)
    if flaw == "off_topic":
        if rng.random() < 0.6:
            other = rng.choice(pool)
            while other.category == item.category:
                other = rng.choice(pool)
            return rng.choice(GOOD_OPENERS[:3]) + other.fact
        return rng.choice(TANGENTS)
    if flaw == "wrong":
        if item.canned:
            return rng.choice(["Goodbye.", "It is Tuesday.", "The answer is 7."])
        return rng.choice(GOOD_OPENERS) + item.wrong_fact
    if flaw == "truncated":
        words = (rng.choice(GOOD_OPENERS[:4]) + item.fact).split()
        keep = max(1, min(len(words) - 2, int(len(words) * rng.uniform(0.3, 0.6))))
        return " ".join(words[:keep]).rstrip(".!,")
    if flaw == "repetitive":
        unit = (
            item.key
            if rng.random() < 0.3
            else rng.choice(["Sure!", "the", "yes", "and", item.fact.split()[0]])
        )
        return " ".join([unit.rstrip(".!")] * rng.randint(5, 9))
    if flaw == "idk":
        return rng.choice(IDK)
    if flaw == "terse":
        return item.key if not item.canned else item.key.split()[0].rstrip("!").lower()
    raise ValueError(f"unknown flaw {flaw!r}")


# ---------------------------------------------------------------------------------------------------------------
# Splits and data files
# ---------------------------------------------------------------------------------------------------------------

# How often each category is drawn for SFT, preferences and the corpus (arithmetic has far more prompts; keep it
# from drowning the rest).
CATEGORY_WEIGHTS = {
    "arithmetic": 3.0,
    "capitals": 2.0,
    "colours": 1.5,
    "animals": 1.5,
    "opposites": 1.5,
    "letters": 1.0,
    "howto": 1.0,
    "greetings": 0.4,
}
FLAW_WEIGHTS = dict(rude=20, off_topic=15, wrong=18, truncated=12, repetitive=12, idk=13, terse=10)


@dataclass
class Splits:
    """Question pools per category: eval held out from everything, sft and preference prompts disjoint."""

    eval: list[Item] = field(default_factory=list)
    sft: dict[str, list[Item]] = field(default_factory=dict)
    pref: dict[str, list[Item]] = field(default_factory=dict)


def split_items(items: list[Item], rng: random.Random, n_eval: int) -> Splits:
    """Partition questions per category so eval prompts are never seen in the corpus, SFT or preferences."""
    by_cat: dict[str, list[Item]] = {}
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    cats = list(CATEGORY_WEIGHTS)
    per_cat = {c: n_eval // len(cats) for c in cats}
    for c in cats[: n_eval - sum(per_cat.values())]:
        per_cat[c] += 1
    s = Splits()
    for c in cats:
        pool = by_cat[c][:]
        rng.shuffle(pool)
        k = per_cat[c]
        if c == "greetings":
            k = min(k, 2)  # only a handful of greetings exist; keep most for training
        s.eval.extend(pool[:k])
        rest = pool[k:]
        half = max(1, len(rest) // 2)
        s.sft[c], s.pref[c] = rest[:half], rest[half:]
    # Top the eval set back up to n_eval from the biggest category when greetings were capped.
    while len(s.eval) < n_eval:
        s.eval.append(s.pref["arithmetic"].pop())
    return s


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys], k=1)[0]


def _with_system(rng: random.Random, user: str, p_system: float) -> list[dict[str, str]]:
    msgs = []
    if rng.random() < p_system:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    msgs.append({"role": "user", "content": user})
    return msgs


def make_sft_rows(s: Splits, rng: random.Random, n: int, all_items: list[Item]) -> list[dict]:
    """SFT rows: mostly good answers, a few mediocre ones (terse/evasive/truncated) so the SFT model is imperfect."""
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        cat = _weighted(rng, CATEGORY_WEIGHTS)
        item = rng.choice(s.sft[cat])
        r = rng.random()
        if r < 0.90:
            ans = good_answer(item, rng)
        else:
            ans = flawed_answer(item, rng.choice(["terse", "terse", "idk", "truncated"]), rng, all_items)
        key = item.prompt + "\x00" + ans
        if key in seen:
            continue
        seen.add(key)
        fmt = rng.random()
        if fmt < 0.75:
            rows.append({"prompt": item.prompt, "completion": ans})
        elif fmt < 0.95:
            msgs = _with_system(rng, item.prompt, 0.5)
            rows.append({"messages": [*msgs, {"role": "assistant", "content": ans}]})
        else:  # a two-turn conversation; the final assistant turn is the completion
            first = rng.choice(s.sft[_weighted(rng, CATEGORY_WEIGHTS)])
            msgs = _with_system(rng, first.prompt, 0.3)
            msgs.append({"role": "assistant", "content": good_answer(first, rng)})
            msgs += [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": ans}]
            rows.append({"messages": msgs})
    return rows


def make_pref_rows(s: Splits, rng: random.Random, n: int, all_items: list[Item]) -> list[dict]:
    """Pairwise preferences: chosen is a good answer, rejected shows one flaw; some carry margin and comment."""
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        cat = _weighted(rng, CATEGORY_WEIGHTS)
        item = rng.choice(s.pref[cat])
        flaw = _weighted(rng, FLAW_WEIGHTS)
        chosen = good_answer(item, rng)
        rejected = flawed_answer(item, flaw, rng, all_items)
        key = "\x00".join([item.prompt, chosen, rejected])
        if key in seen or chosen == rejected:
            continue
        seen.add(key)
        prompt: str | list[dict[str, str]] = item.prompt
        if rng.random() < 0.1:
            prompt = _with_system(rng, item.prompt, 0.6)
        row: dict = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if rng.random() < 0.4:
            row["margin"] = SEVERITY[flaw]
        if rng.random() < 0.25:
            row["comment"] = rng.choice(COMMENTS[flaw])
        rows.append(row)
    return rows


def make_corpus(s: Splits, rng: random.Random, n: int, all_items: list[Item]) -> list[str]:
    """Pretraining documents: chat-formatted conversations, ~65% good and ~35% flawed answers, eval excluded."""
    pools = {c: s.sft[c] + s.pref[c] for c in CATEGORY_WEIGHTS}
    docs: list[str] = []
    for _ in range(n):
        turns = 2 if rng.random() < 0.08 else 1
        msgs = _with_system(rng, "", 0.15)[:-1]
        for _ in range(turns):
            item = rng.choice(pools[_weighted(rng, CATEGORY_WEIGHTS)])
            if rng.random() < 0.65:
                ans = good_answer(item, rng)
            else:
                ans = flawed_answer(item, _weighted(rng, FLAW_WEIGHTS), rng, all_items)
            msgs += [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": ans}]
        docs.append(render_chat(msgs))
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One compact JSON object per line, keys in insertion order: byte-identical for the same seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate_data(out: Path, seed: int, n_sft: int, n_pref: int, n_eval: int, n_corpus: int) -> list[str]:
    """Write the data files under ``out/data`` and return the pretraining corpus (kept in memory, not saved)."""
    rng = random.Random(seed)
    items = build_items(random.Random(seed + 1))
    splits = split_items(items, rng, n_eval)
    sft = make_sft_rows(splits, random.Random(seed + 2), n_sft, items)
    pref = make_pref_rows(splits, random.Random(seed + 3), n_pref, items)
    evals = [{"prompt": it.prompt} for it in splits.eval]
    random.Random(seed + 4).shuffle(evals)
    data = out / "data"
    write_jsonl(data / "sft.jsonl", sft)
    write_jsonl(data / "preferences.jsonl", pref)
    write_jsonl(data / "eval_prompts.jsonl", evals)
    return make_corpus(splits, random.Random(seed + 5), n_corpus, items)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------------------


def train_tokenizer(corpus: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Byte-level BPE on the corpus, wrapped for transformers with the chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on the text with the special markers stripped so BPE does not waste merges on them.
    plain = [d.replace(BOS, "") for d in corpus]
    for t in [EOS, *ROLE_TOKENS]:
        plain = [d.replace(t, "\n") for d in plain]
    tok.train_from_iterator(plain, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, tokenizer, hidden: int, layers: int):  # -> LlamaForCausalLM
    """A tiny Llama: enough capacity to learn the world's styles, small enough for CPU CI."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(cfg)


def packed_batches(ids: list[int], seq_len: int, batch: int, rng: random.Random) -> Iterator[list[list[int]]]:
    """Endless batches of random windows over the concatenated corpus (simple, fast, no padding)."""
    hi = len(ids) - seq_len - 1
    while True:
        yield [ids[s : s + seq_len] for s in (rng.randrange(hi) for _ in range(batch))]


def pretrain(
    model, corpus_ids: list[int], steps: int, seed: int, lr: float, seq_len: int, batch: int
) -> float:
    """Plain seeded PyTorch loop (AdamW, warmup + cosine); returns the mean loss over the last 20 steps."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)

    def sched(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    lrs = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    batches = packed_batches(corpus_ids, seq_len, batch, random.Random(seed))
    recent: list[float] = []
    bar = tqdm(range(steps), desc="pretraining", unit="step")
    for _ in bar:
        x = torch.tensor(next(batches))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lrs.step()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    model.eval()
    return sum(recent) / len(recent)


MODEL_CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [preftune, tiny, llama, testing]
---

# preftune tiny-llama

A {params_m:.2f}M-parameter `LlamaForCausalLM` made by `examples/make_examples.py` (seed {seed}) for preftune's
tests and local demo runs. It is **not** a useful language model: it knows only a small synthetic assistant world
(arithmetic, capitals of real and invented countries, colours, animal sounds and legs, opposites, word lengths,
simple how-tos, greetings).

- Architecture: hidden {hidden}, {layers} layers, 4 heads, intermediate {inter}, max positions 512, tied
  embeddings, no dropout.
- Tokenizer: byte-level BPE, {vocab} tokens, trained on the corpus with the `tokenizers` library.
- Pretraining: {steps} AdamW steps (batch {batch} x {seq_len} tokens, peak lr {lr}) on {n_docs} synthetic
  chat-formatted conversations, about 65% good answers and 35% flawed ones (rude, off-topic, wrong, truncated,
  repetitive, evasive, terse), so it can produce both. Final training loss {loss:.3f}.

Chat format (the tokenizer's chat template; `{eos}` is the eos token and ends every turn):

```
{bos}<|system|>\\nYou are a helpful assistant.{eos}\\n<|user|>\\nWhat is 3 plus 4?{eos}\\n<|assistant|>\\n
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("examples/tiny-llama")
model = AutoModelForCausalLM.from_pretrained("examples/tiny-llama")
ids = tok.apply_chat_template(
    [{{"role": "user", "content": "What is 3 plus 4?"}}],
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=True,
)
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
```

Regenerate with `python examples/make_examples.py --seed {seed} --steps {steps}`.
"""


def patch_tokenizer_config(path: Path) -> None:
    """Name the class every transformers version knows and inline the chat template for older readers."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def greedy_samples(model, tok, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to chat prompts: a quick look that the model speaks the corpus' language."""
    import torch

    outs = []
    for p in prompts:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        outs.append(tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return outs


def dir_size(path: Path) -> int:
    """Total bytes of the files under path."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder (examples/)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed for data, tokenizer order and weights")
    ap.add_argument("--steps", type=int, default=500, help="pretraining steps")
    ap.add_argument("--data-only", action="store_true", help="write only data/*.jsonl (fast, no torch)")
    ap.add_argument("--n-sft", type=int, default=2000)
    ap.add_argument("--n-pref", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--n-corpus", type=int, default=20000, help="pretraining conversations (in memory)")
    ap.add_argument("--vocab-size", type=int, default=1536)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: reproducible, robust on busy hosts)"
    )
    args = ap.parse_args(argv)

    t0 = time.time()
    out: Path = args.out
    corpus = generate_data(out, args.seed, args.n_sft, args.n_pref, args.n_eval, args.n_corpus)
    summary = {name: sum(1 for _ in (out / "data" / name).open()) for name in ("sft.jsonl", "preferences.jsonl",
                                                                             "eval_prompts.jsonl")}  # fmt: skip
    print(f"data: {summary} corpus: {len(corpus)} conversations, {sum(map(len, corpus)) / 1e6:.2f}M chars")
    if args.data_only:
        return

    import torch
    from transformers import GenerationConfig

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = train_tokenizer(corpus, args.vocab_size)
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(corpus):
        ids.extend(enc.ids)
    print(f"tokenizer: {len(tok)} tokens; corpus {len(ids) / 1e6:.2f}M tokens")

    model = build_model(len(tok), tok, args.hidden, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    loss = pretrain(model, ids, args.steps, args.seed, args.lr, args.seq_len, args.batch)

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=64,
    )
    mdir = out / "tiny-llama"
    mdir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(mdir, safe_serialization=True)
    tok.save_pretrained(mdir)
    patch_tokenizer_config(mdir / "tokenizer_config.json")
    card = MODEL_CARD.format(
        params_m=n_params / 1e6, seed=args.seed, hidden=args.hidden, layers=args.layers, inter=args.hidden * 4,
        vocab=len(tok), steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, n_docs=len(corpus),
        loss=loss, bos=BOS, eos=EOS,
    )  # fmt: skip
    (mdir / "README.md").write_text(card, encoding="utf-8")

    for p, a in zip(["What is 3 plus 4?", "What is the capital of France?", "How do I make tea?"],
                    greedy_samples(model, tok, ["What is 3 plus 4?", "What is the capital of France?",
                                                "How do I make tea?"]), strict=True):  # fmt: skip
        print(f"  {p!r} -> {a!r}")
    print(
        f"done in {time.time() - t0:.0f}s: {n_params:,} params, final loss {loss:.3f}, "
        f"tiny-llama {dir_size(mdir) / 1e6:.2f} MB, data {dir_size(out / 'data') / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
