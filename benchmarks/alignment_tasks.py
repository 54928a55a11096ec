"""The alignment benchmark's preference tasks: synthetic texts from templates and vocabularies, labelled by
scorers this project did not write.

Each task has its own prompts, its own responses and its own scorer from PyPI:

- ``sentiment``: short film reviews; the scorer is VADER's compound polarity (vaderSentiment, a lexicon and
  rule-based sentiment analyser), in [-1, 1], higher = more positive.
- ``readability``: short explanations of everyday topics; the scorer is minus the Automated Readability Index
  (textstat: 4.71 x characters per word + 0.5 x words per sentence - 21.43, a US school grade), so higher =
  easier to read. ARI needs no pronunciation dictionary, so nothing is downloaded at run time.

A response mixes, slot by slot, words and sentence shapes the scorer likes and dislikes, so a model fitted to the
SFT data answers with the whole range and preference learning has room to move it. A preference pair is two
responses to one prompt; the scorer's higher one is chosen (pairs closer than ``min_gap`` are dropped). Prompts
are split by subject (film title, topic) so that the held-out prompts ask about things no training row saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# -------------------------------------------------------------------------------------------------- sentiment

_TITLE_A = [
    "Silent",
    "Quiet",
    "Broken",
    "Golden",
    "Hidden",
    "Last",
    "Northern",
    "Crimson",
    "Distant",
    "Paper",
    "Winter",
    "Summer",
    "Hollow",
    "Bright",
    "Lonely",
    "Second",
    "Little",
    "Wild",
    "Empty",
    "Burning",
    "Frozen",
    "Secret",
    "Lost",
    "Iron",
    "Velvet",
    "Silver",
    "Midnight",
    "Falling",
    "Painted",
    "Open",
]
_TITLE_B = [
    "Harbor",
    "River",
    "Garden",
    "Mirror",
    "Road",
    "Station",
    "Letter",
    "Island",
    "Tower",
    "Window",
    "City",
    "Forest",
    "Bridge",
    "Valley",
    "Orchard",
    "Lantern",
    "Kingdom",
    "Shore",
    "Machine",
    "Signal",
    "Theatre",
    "Desert",
    "Engine",
    "Voyage",
    "Meadow",
    "Circus",
    "Archive",
    "Village",
    "Canyon",
    "Echo",
]
_GENRES = [
    "drama",
    "comedy",
    "thriller",
    "western",
    "musical",
    "documentary",
    "horror",
    "romance",
    "mystery",
    "adventure",
    "fantasy",
    "satire",
]
_ASPECTS = [
    "acting",
    "plot",
    "score",
    "pacing",
    "dialogue",
    "ending",
    "cinematography",
    "cast",
    "script",
    "direction",
    "soundtrack",
    "story",
    "humour",
    "editing",
    "lighting",
    "costumes",
    "finale",
    "premise",
    "characters",
    "visuals",
]
_POSITIVE = [
    "wonderful",
    "brilliant",
    "charming",
    "moving",
    "delightful",
    "superb",
    "beautiful",
    "clever",
    "gripping",
    "lovely",
    "excellent",
    "fantastic",
    "touching",
    "warm",
    "inspiring",
    "great",
    "impressive",
    "joyful",
    "sweet",
    "elegant",
]
_NEGATIVE = [
    "dull",
    "awful",
    "boring",
    "clumsy",
    "terrible",
    "weak",
    "messy",
    "tedious",
    "bland",
    "poor",
    "horrible",
    "disappointing",
    "stupid",
    "ugly",
    "annoying",
    "painful",
    "lifeless",
    "sloppy",
    "grim",
    "pathetic",
]
_NEUTRAL = [
    "long",
    "quiet",
    "simple",
    "familiar",
    "unusual",
    "modest",
    "plain",
    "short",
    "steady",
    "ordinary",
    "deliberate",
    "straightforward",
]
_REVIEW_PROMPTS = (
    "Write a short review of the film {title}.",
    "What did you think of the {genre} film {title}?",
    "Review the {genre} movie {title} in a few sentences.",
    "Give me your opinion of {title}.",
    "How was {title}, the new {genre}?",
)
_REVIEW_SENTENCES = (
    "{title} is a {w1} {genre} with {w2} {a1}.",
    "The {a1} is {w1} and the {a2} feels {w2}.",
    "I found the {a1} {w1}, though the {a2} was {w2}.",
    "Overall, a {w1} film with a {w2} {a1}.",
    "The {a1} felt {w1}, and the {a2} was {w2} too.",
    "It has {w1} {a1} and a {w2} {a2}.",
)


def _opinion(rng: random.Random) -> str:
    pool = rng.choices((_POSITIVE, _NEGATIVE, _NEUTRAL), weights=(0.4, 0.4, 0.2))[0]
    return rng.choice(pool)


def _review_subjects(rng: random.Random) -> list[dict[str, str]]:
    titles = [f"The {a} {b}" for a in _TITLE_A for b in _TITLE_B]
    rng.shuffle(titles)
    return [{"title": t, "genre": rng.choice(_GENRES)} for t in titles]


def _review_prompt(subject: dict[str, str], rng: random.Random) -> str:
    return rng.choice(_REVIEW_PROMPTS).format(**subject)


def _review(subject: dict[str, str], rng: random.Random) -> str:
    sentences = []
    for template in rng.sample(_REVIEW_SENTENCES, rng.choice((2, 2, 3))):
        a1, a2 = rng.sample(_ASPECTS, 2)
        sentences.append(template.format(w1=_opinion(rng), w2=_opinion(rng), a1=a1, a2=a2, **subject))
    return " ".join(sentences)


def vader_compound() -> Callable[[str], float]:
    """VADER's compound polarity of a text, in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyser = SentimentIntensityAnalyzer()
    return lambda text: float(analyser.polarity_scores(text)["compound"])


# ------------------------------------------------------------------------------------------------ readability

_TOPICS = [
    "rain",
    "volcanoes",
    "bridges",
    "bees",
    "tides",
    "rainbows",
    "magnets",
    "glaciers",
    "bread",
    "yeast",
    "clocks",
    "compasses",
    "batteries",
    "thunder",
    "earthquakes",
    "fossils",
    "seeds",
    "coral",
    "deserts",
    "wind",
    "bicycles",
    "kites",
    "windmills",
    "lighthouses",
    "canals",
    "vaccines",
    "sleep",
    "memory",
    "muscles",
    "bones",
    "lungs",
    "hearts",
    "eyes",
    "ears",
    "teeth",
    "soap",
    "ice",
    "steam",
    "rust",
    "copper",
    "glass",
    "paper",
    "ink",
    "maps",
    "satellites",
    "rockets",
    "planets",
    "comets",
    "eclipses",
    "seasons",
    "forests",
    "rivers",
    "soil",
    "worms",
    "ants",
    "owls",
    "whales",
    "bats",
    "penguins",
    "salmon",
    "mushrooms",
    "cheese",
    "coffee",
    "tea",
    "honey",
    "sugar",
    "salt",
]
_EXPLAIN_PROMPTS = (
    "Explain {topic} to me.",
    "How do {topic} work?",
    "Tell me about {topic}.",
    "What should I know about {topic}?",
    "Can you describe {topic} for a beginner?",
)
# (plain word, the long word a scorer of readability dislikes) for each slot
_WORDS: dict[str, tuple[str, str]] = {
    "use": ("use", "utilize"),
    "help": ("help", "facilitate"),
    "show": ("show", "demonstrate"),
    "big": ("big", "substantial"),
    "start": ("start", "commence"),
    "about": ("about", "approximately"),
    "make": ("make", "manufacture"),
    "need": ("need", "necessitate"),
    "end": ("end", "terminate"),
    "get": ("get", "obtain"),
    "many": ("many", "numerous"),
    "part": ("part", "component"),
    "change": ("change", "transformation"),
    "way": ("way", "methodology"),
    "key": ("key", "fundamental"),
    "so": ("so", "consequently"),
    "also": ("also", "additionally"),
    "often": ("often", "frequently"),
    "fast": ("fast", "expeditiously"),
    "clear": ("clear", "unambiguous"),
    "work": ("work", "operate"),
    "keep": ("keep", "maintain"),
    "find": ("find", "ascertain"),
    "build": ("build", "construct"),
}
_SHORT = (
    "{Topic} {work} in a {clear} {way}.",
    "A {key} {part} of {topic} is {change}.",
    "People {use} {topic} to {get} what they {need}.",
    "{Many} things {help} {topic} {work}.",
    "You can {find} {topic} {often}.",
    "{Topic} {start} small and {end} {big}.",
    "Scientists {build} models to {show} how {topic} {work}.",
    "We {keep} learning {about} {topic}.",
)
# joins two short sentences into one long one (longer sentences raise the grade)
_JOINS = (", and {so} ", ", which {also} means that ", "; in other words, ", ", because ")


def _explain_subjects(rng: random.Random) -> list[dict[str, str]]:
    topics = list(_TOPICS)
    rng.shuffle(topics)
    return [{"topic": t} for t in topics]


def _explain_prompt(subject: dict[str, str], rng: random.Random) -> str:
    return rng.choice(_EXPLAIN_PROMPTS).format(**subject)


def _fill(template: str, topic: str, plain: float, rng: random.Random) -> str:
    words = {k: v[0] if rng.random() < plain else v[1] for k, v in _WORDS.items()}
    text = template.format(topic=topic, Topic=topic.capitalize(), Many="{Many}", **words)
    return text.replace("{Many}", words["many"].capitalize())


def _explanation(subject: dict[str, str], rng: random.Random) -> str:
    plain = rng.random()  # how plain this answer's words are: the range the SFT model learns
    parts = [_fill(t, subject["topic"], plain, rng) for t in rng.sample(_SHORT, rng.choice((2, 3, 4)))]
    out = parts[0]
    for part in parts[1:]:
        if rng.random() < 0.5:  # one long sentence instead of two short ones
            join = rng.choice(_JOINS).format(
                so=_fill("{so}", "", plain, rng), also=_fill("{also}", "", plain, rng)
            )
            out = out[:-1] + join + part[0].lower() + part[1:]
        else:
            out += " " + part
    return out


def minus_ari() -> Callable[[str], float]:
    """Minus textstat's Automated Readability Index of a text: higher = easier (a lower school grade)."""
    import textstat

    return lambda text: -float(textstat.automated_readability_index(text))


# ------------------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Task:
    """One preference task: how its subjects, prompts and responses are drawn, and its scorer (a factory, so
    the scorer's library loads only where it is used)."""

    name: str
    scorer_name: str
    subjects: Callable[[random.Random], list[dict[str, str]]]
    prompt: Callable[[dict[str, str], random.Random], str]
    response: Callable[[dict[str, str], random.Random], str]
    scorer: Callable[[], Callable[[str], float]]
    min_gap: float


TASKS: dict[str, Task] = {
    "sentiment": Task(
        "sentiment", "VADER compound (vaderSentiment)", _review_subjects, _review_prompt, _review,
        vader_compound, 0.05,
    ),
    "readability": Task(
        "readability", "minus Automated Readability Index (textstat)", _explain_subjects, _explain_prompt,
        _explanation, minus_ari, 0.5,
    ),
}  # fmt: skip


@dataclass
class TaskData:
    """A task's rows: SFT examples, train and held-out preference pairs, held-out prompts, and a pretraining
    corpus of plain texts (prompts and responses), all in preftune's contract shapes."""

    sft: list[dict[str, Any]]
    train_pairs: list[dict[str, Any]]
    eval_pairs: list[dict[str, Any]]
    eval_prompts: list[dict[str, Any]]
    corpus: list[str]


def _pairs(
    task: Task, subjects: list[dict[str, str]], n: int, score: Callable[[str], float], rng: random.Random
):
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        subject = rng.choice(subjects)
        a, b = task.response(subject, rng), task.response(subject, rng)
        sa, sb = score(a), score(b)
        if abs(sa - sb) < task.min_gap:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append({"prompt": user(task.prompt(subject, rng)), "chosen": chosen, "rejected": rejected})
    return rows


def user(text: str) -> list[dict[str, str]]:
    """A prompt as the contract's chat messages."""
    return [{"role": "user", "content": text}]


def make_task_data(
    task: Task, *, seed: int = 0, n_sft: int = 1500, n_pairs: int = 1500, n_eval_prompts: int = 100,
    eval_pair_fraction: float = 0.1, n_corpus: int = 20000,
) -> TaskData:  # fmt: skip
    """The task's data, deterministic in ``seed``; held-out prompts and pairs use subjects no training row has."""
    rng = random.Random(f"{task.name}-{seed}")
    score = task.scorer()
    subjects = task.subjects(rng)
    cut = max(1, len(subjects) // 8)
    held_out, train = subjects[:cut], subjects[cut:]
    sft = []
    for _ in range(n_sft):
        subject = rng.choice(train)
        sft.append({"prompt": user(task.prompt(subject, rng)), "completion": task.response(subject, rng)})
    n_eval_pairs = round(n_pairs * eval_pair_fraction)
    train_pairs = _pairs(task, train, n_pairs - n_eval_pairs, score, rng)
    eval_pairs = _pairs(task, held_out, n_eval_pairs, score, rng)
    eval_prompts = [{"prompt": task.prompt(rng.choice(held_out), rng)} for _ in range(n_eval_prompts)]
    corpus = []
    for _ in range(n_corpus):  # general text about every subject: no scorer label reaches the base model
        subject = rng.choice(subjects)
        corpus.append(task.prompt(subject, rng) + "\n" + task.response(subject, rng))
    return TaskData(sft, train_pairs, eval_pairs, eval_prompts, corpus)
