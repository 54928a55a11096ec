"""Turn ranked lists, scalar ratings and binary feedback into candidate preference pairs, one prompt at a time.

Every candidate remembers the input rows (units) behind each side, so the importer can say of every row whether
it ended in an accepted pair or why not. Pairs are made within one prompt, and at most ``max_pairs_per_prompt``
of them (0 = no cap) in every format that makes several: a ranked list of K responses no longer becomes K²/2
pairs. Rows naming the same response to the same prompt (whitespace-trimmed text) are one *response*: several
ratings of it are averaged, several thumbs are a vote. Everything is deterministic: same rows, same parameters,
same seed -> same pairs in the same order.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.config.preference_import import RANKED_PAIRS_CHOICES
from preftune.data import records

RANKED_MODES = RANKED_PAIRS_CHOICES
#: Above this many possible pairs in one ranked list, the capped pairs are drawn at random (seeded) instead of
#: chosen among all of them.
ENUMERATE_LIMIT = 100_000


@dataclass
class Candidate:
    """A pair in the contract's shape (its ``meta`` not yet written) plus the units (input rows) behind its
    chosen and rejected sides. ``meta`` says what the pair's meta is made of: ``("ranked", row meta, ranks)`` or
    ``("sides", chosen rows' metas, rejected rows' metas)``, each meta with its unit."""

    pair: dict[str, Any]
    chosen_units: list[int]
    rejected_units: list[int]
    nodes: tuple[int, int] = (0, 0)
    meta: tuple[Any, ...] = ()

    @property
    def units(self) -> list[int]:
        return list(dict.fromkeys(self.chosen_units + self.rejected_units))


@dataclass
class Pairing:
    """Candidates, rows rejected while pairing (``unit -> (reason, detail)``), why rows made no pair, counters."""

    candidates: list[Candidate] = field(default_factory=list)
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)
    unpaired: dict[int, str] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)


def _number(value: float) -> float | int:
    """Ranks read back as they were written: 2 rather than 2.0 when whole."""
    return int(value) if value.is_integer() else value


def _pair(
    prompt: list[dict[str, str]], chosen: str, rejected: str, margin: float | None, **extra: Any
) -> dict[str, Any]:
    row = {
        "id": records.record_id({"prompt": prompt, "chosen": chosen, "rejected": rejected}),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "margin": margin,
    }
    row.update(extra)
    return row


def _rng(seed: int, group: str) -> random.Random:
    return random.Random(hashlib.sha256(f"{seed}\0{group}".encode()).hexdigest())


def cap_pairs(candidates: list[Any], cap: int, seed: int, group: str) -> tuple[list[Any], int]:
    """At most ``cap`` candidates (0 = no cap), chosen in a seeded shuffle order that first takes pairs of two
    responses not yet covered, then of one, then any, so capping drops as few rows as it can. Returns (kept, in
    input order; how many were dropped). Candidates are anything with ``nodes`` (the two responses it pairs)."""
    if cap <= 0 or len(candidates) <= cap:
        return candidates, 0
    order = list(range(len(candidates)))
    _rng(seed, group).shuffle(order)
    taken: list[int] = []
    chosen: set[int] = set()
    covered: set[int] = set()
    for fresh in (2, 1, 0):  # first pairs of two uncovered responses, then of one, then any
        for i in order:
            if len(taken) >= cap:
                break
            if i not in chosen and len(set(candidates[i].nodes) - covered) >= fresh:
                taken.append(i)
                chosen.add(i)
                covered.update(candidates[i].nodes)
    return [candidates[i] for i in sorted(taken)], len(candidates) - len(taken)


# ---------------------------------------------------------------------------------------------- ranked


@dataclass(frozen=True)
class _Edge:
    nodes: tuple[int, int]
    order: int


def ranked_edges(
    ranks: Sequence[float], mode: str, cap: int, seed: int, group: str
) -> tuple[list[tuple[int, int]], int, int]:
    """Which responses of a ranked list pair, as ``(better, worse)`` index pairs in a fixed order: every
    better-ranked response over every worse one (``all``), or across consecutive distinct rank levels only
    (``adjacent``), at most ``cap``. Returns (pairs, ties, pairs left out by the cap); never builds more than
    :data:`ENUMERATE_LIMIT` pairs, however long the list."""
    if mode not in RANKED_MODES:
        raise ValueError(f"ranked_pairs must be one of {', '.join(RANKED_MODES)}, got {mode!r}")
    levels: dict[float, list[int]] = {}
    for index in sorted(range(len(ranks)), key=lambda n: (ranks[n], n)):
        levels.setdefault(ranks[index], []).append(index)
    order = sorted(levels)
    ties = sum(len(m) * (len(m) - 1) // 2 for m in levels.values())
    later = {a: (order[n + 1 : n + 2] if mode == "adjacent" else order[n + 1 :]) for n, a in enumerate(order)}
    total = sum(len(levels[a]) * sum(len(levels[b]) for b in later[a]) for a in order)

    def enumerate_all() -> Iterator[tuple[int, int]]:
        for a in order:
            for i in levels[a]:
                for b in later[a]:
                    for j in levels[b]:
                        yield i, j

    if cap <= 0 or total <= cap:
        return list(enumerate_all()), ties, 0
    if total <= ENUMERATE_LIMIT:
        edges = [_Edge(nodes, n) for n, nodes in enumerate(enumerate_all())]
        kept, dropped = cap_pairs(edges, cap, seed, group)
        return [e.nodes for e in kept], ties, dropped
    return _sampled(levels, order, later, cap, seed, group), ties, total - cap


def _sampled(
    levels: dict[float, list[int]],
    order: list[float],
    later: dict[float, list[float]],
    cap: int,
    seed: int,
    group: str,
) -> list[tuple[int, int]]:
    """``cap`` distinct pairs drawn at random (seeded) from a list with too many to enumerate."""
    rng = _rng(seed, group)
    weights = [len(levels[a]) * sum(len(levels[b]) for b in later[a]) for a in order]
    picked: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    while len(picked) < cap:
        a_index = rng.choices(range(len(order)), weights)[0]
        a = order[a_index]
        b = rng.choices(later[a], [len(levels[x]) for x in later[a]])[0]
        i, j = rng.choice(levels[a]), rng.choice(levels[b])
        picked.setdefault((i, j), (a_index, levels[a].index(i), order.index(b), levels[b].index(j)))
    return sorted(picked, key=picked.__getitem__)


def ranked_candidates(
    unit: int,
    prompt: list[dict[str, str]],
    responses: list[str],
    ranks: list[float],
    meta: dict[str, Any],
    source: dict[str, Any],
    *,
    mode: str,
    cap: int,
    seed: int,
    out: Pairing,
) -> None:
    """Pairs of one ranked list; the margin is the rank gap. Equal ranks are ties and make no pair."""
    edges, ties, dropped = ranked_edges(ranks, mode, cap, seed, records.canonical_json([prompt, responses]))
    out.stats["pairs_tied"] += ties
    out.stats["pairs_capped"] += dropped
    for i, j in edges:
        better, worse = ranks[i], ranks[j]
        pair = _pair(prompt, responses[i], responses[j], worse - better, source=dict(source))
        ranked = {"chosen": _number(better), "rejected": _number(worse)}
        out.candidates.append(Candidate(pair, [unit], [unit], (i, j), ("ranked", meta, ranked)))
    if not edges:
        out.unpaired[unit] = f"all {len(responses)} responses share one rank (ties make no pair)"


# ---------------------------------------------------------------------------------------------- ratings, thumbs


@dataclass
class Response:
    """One distinct response to one prompt, with every row that rated or voted on it."""

    text: str
    units: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)


def _sides(chosen: Response, rejected: Response) -> tuple[dict[str, Any], tuple[Any, ...]]:
    first = chosen.sources[0]
    source = {
        "file": first["file"],
        "row": first["row"],
        "chosen": list(chosen.sources),
        "rejected": list(rejected.sources),
    }
    sides = (
        "sides",
        list(zip(chosen.units, chosen.metas, strict=True)),
        list(zip(rejected.units, rejected.metas, strict=True)),
    )
    return source, sides


def rating_group(
    key: str,
    prompt: list[dict[str, str]],
    responses: list[Response],
    *,
    min_score_gap: float,
    cap: int,
    seed: int,
    out: Pairing,
) -> None:
    """Pairs from the ratings of one prompt (``values`` are z-scores within each rater): a response's score is the
    mean z of its ratings, and two responses pair when their scores differ by at least ``min_score_gap`` (and by
    more than 0). The margin is that difference; ``scores`` carries both sides' normalised scores."""
    import math

    score = [math.fsum(r.values) / len(r.values) for r in responses]
    found: list[Candidate] = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            gap = score[i] - score[j]
            if gap == 0 or abs(gap) < min_score_gap:
                out.stats["pairs_below_gap"] += 1
                continue
            c, r = (i, j) if gap > 0 else (j, i)
            source, sides = _sides(responses[c], responses[r])
            scores = {"chosen": score[c], "rejected": score[r]}
            pair = _pair(prompt, responses[c].text, responses[r].text, abs(gap), scores=scores, source=source)
            found.append(Candidate(pair, list(responses[c].units), list(responses[r].units), (c, r), sides))
    kept, dropped = cap_pairs(found, cap, seed, key)
    out.stats["pairs_capped"] += dropped
    out.candidates.extend(kept)
    _explain_unpaired(out, responses, kept, found, "ratings", min_score_gap)


def _explain_unpaired(
    out: Pairing,
    responses: list[Response],
    kept: list[Candidate],
    found: list[Candidate],
    what: str,
    gap: float,
) -> None:
    """Say why each response of a prompt ended in no pair."""
    in_kept = {n for c in kept for n in c.nodes}
    in_found = {n for c in found for n in c.nodes}
    for n, response in enumerate(responses):
        if n in in_kept:
            continue
        if len(responses) == 1:
            why = "the only response to its prompt"
        elif n in in_found:
            why = "left out by max_pairs_per_prompt"
        elif what == "ratings":
            why = f"its score differs from every other response's by less than min_score_gap={gap}"
        else:
            why = "no response to its prompt got the opposite label"
        for unit in response.units:
            out.unpaired.setdefault(unit, why)


def _vote(response: Response, out: Pairing) -> float | None:
    """A response voted both ways takes the majority; the outvoted rows (all of them on a draw) are rejected as
    ``contradiction``. Returns the label that stands (None on a draw)."""
    votes = Counter(response.values)
    up, down = votes.get(1.0, 0), votes.get(0.0, 0)
    if not (up and down):
        return response.values[0]
    majority = 1.0 if up > down else 0.0 if down > up else None
    for unit, value in zip(response.units, response.values, strict=True):
        if value != majority:
            out.rejected[unit] = (
                "contradiction",
                f"the same response got {up} up and {down} down votes"
                + ("" if majority is None else "; this row is outvoted"),
            )
    keep = [i for i, v in enumerate(response.values) if v == majority]
    for name in ("units", "values", "metas", "sources"):
        setattr(response, name, [getattr(response, name)[i] for i in keep])
    return majority


def binary_group(
    key: str, prompt: list[dict[str, str]], responses: list[Response], *, cap: int, seed: int, out: Pairing
) -> None:
    """Pairs from the thumbs of one prompt: every up-voted response over every down-voted one, at most ``cap``
    (seeded); see :func:`_vote` for a response voted both ways."""
    ups: list[int] = []
    downs: list[int] = []
    for n, response in enumerate(responses):
        label = _vote(response, out)
        if label is not None:
            (ups if label == 1.0 else downs).append(n)
    found = []
    for u in ups:
        for d in downs:
            source, sides = _sides(responses[u], responses[d])
            pair = _pair(prompt, responses[u].text, responses[d].text, None, source=source)
            found.append(Candidate(pair, list(responses[u].units), list(responses[d].units), (u, d), sides))
    kept, dropped = cap_pairs(found, cap, seed, key)
    out.stats["pairs_capped"] += dropped
    out.candidates.extend(kept)
    _explain_unpaired(out, responses, kept, found, "labels", 0.0)
