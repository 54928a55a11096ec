"""Turn ranked lists, scalar ratings and binary feedback into candidate preference pairs.

Every candidate remembers the input rows (units) behind each side, so the importer can say of every row whether
it ended in an accepted pair or why not. Pairs are made within one prompt. Rows naming the same response to the
same prompt (whitespace-trimmed text) are one *response*: several ratings of it are averaged, several thumbs are
a vote. Everything is deterministic: same rows, same parameters, same seed -> same pairs in the same order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.config.preference_import import RANKED_PAIRS_CHOICES
from preftune.data import records
from preftune.data.formats import Observation, RankedList

RANKED_MODES = RANKED_PAIRS_CHOICES


@dataclass
class Candidate:
    """A pair in the contract's shape plus the units (input rows) behind its chosen and rejected sides."""

    pair: dict[str, Any]
    chosen_units: list[int]
    rejected_units: list[int]
    nodes: tuple[int, int] = (0, 0)

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


def ranked_pairs(lists: Sequence[RankedList], mode: str = "all") -> Pairing:
    """Pairs from ranked lists: every better-ranked response over every worse one (``all``), or only across
    consecutive distinct rank levels (``adjacent``: ranks 1, 2, 2, 4 pair level 1 with 2 and level 2 with 4).
    The margin is the rank gap. Equal ranks are ties and make no pair (counted in ``pairs_tied``)."""
    if mode not in RANKED_MODES:
        raise ValueError(f"ranked_pairs must be one of {', '.join(RANKED_MODES)}, got {mode!r}")
    out = Pairing()
    for item in lists:
        k = len(item.responses)
        out.stats["pairs_tied"] += sum(
            1 for i in range(k) for j in range(i + 1, k) if item.ranks[i] == item.ranks[j]
        )
        levels = sorted(set(item.ranks))
        following = {a: b for a, b in zip(levels, levels[1:], strict=False)}
        made = 0
        for i in sorted(range(k), key=lambda n: (item.ranks[n], n)):
            for j in sorted(range(k), key=lambda n: (item.ranks[n], n)):
                better, worse = item.ranks[i], item.ranks[j]
                if not better < worse or (mode == "adjacent" and following.get(better) != worse):
                    continue
                meta = {**item.meta, "ranks": {"chosen": _number(better), "rejected": _number(worse)}}
                pair = _pair(
                    item.prompt,
                    item.responses[i],
                    item.responses[j],
                    worse - better,
                    meta=meta,
                    source=dict(item.source),
                )
                out.candidates.append(Candidate(pair, [item.unit], [item.unit]))
                made += 1
        if not made:
            out.unpaired[item.unit] = f"all {k} responses share one rank (ties make no pair)"
    return out


def zscores(observations: Sequence[Observation]) -> list[float]:
    """Each score as a z-score within its rater (rows without a rater form one pool: the whole import).

    A rater whose scores never vary says nothing about preference: all their scores become 0.
    """
    pools: dict[str | None, list[int]] = {}
    for i, obs in enumerate(observations):
        pools.setdefault(obs.rater, []).append(i)
    z = [0.0] * len(observations)
    for members in pools.values():
        values = [observations[i].value for i in members]
        mean = math.fsum(values) / len(values)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
        for i in members:
            z[i] = (observations[i].value - mean) / std if std > 0 else 0.0
    return z


@dataclass
class _Response:
    """One distinct response to one prompt, with every row that rated or voted on it."""

    text: str
    units: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)


def _group(
    observations: Sequence[Observation], values: Sequence[float]
) -> dict[str, tuple[list[dict[str, str]], list[_Response]]]:
    """Observations by prompt, then by trimmed response text, in first-seen order."""
    groups: dict[str, tuple[list[dict[str, str]], dict[str, _Response]]] = {}
    for obs, value in zip(observations, values, strict=True):
        key = records.canonical_json(obs.prompt)
        prompt, responses = groups.setdefault(key, (obs.prompt, {}))
        response = responses.setdefault(obs.response.strip(), _Response(obs.response))
        response.units.append(obs.unit)
        response.values.append(value)
        response.metas.append(obs.meta)
        response.sources.append(obs.source)
    return {key: (prompt, list(responses.values())) for key, (prompt, responses) in groups.items()}


def _sides(chosen: _Response, rejected: _Response) -> dict[str, Any]:
    first = chosen.sources[0]
    return {
        "meta": {"chosen": list(chosen.metas), "rejected": list(rejected.metas)},
        "source": {
            "file": first["file"],
            "row": first["row"],
            "chosen": list(chosen.sources),
            "rejected": list(rejected.sources),
        },
    }


def cap_pairs(candidates: list[Candidate], cap: int, seed: int, group: str) -> tuple[list[Candidate], int]:
    """At most ``cap`` candidates (0 = no cap), chosen in a seeded shuffle order that first takes pairs of two
    responses not yet covered, then of one, then any, so capping drops as few rows as it can. Returns (kept, in
    input order; how many were dropped)."""
    if cap <= 0 or len(candidates) <= cap:
        return candidates, 0
    rng = random.Random(hashlib.sha256(f"{seed}\0{group}".encode()).hexdigest())
    order = list(range(len(candidates)))
    rng.shuffle(order)
    taken: list[int] = []
    covered: set[int] = set()
    for fresh in (2, 1, 0):  # first pairs of two uncovered responses, then of one, then any
        for i in order:
            if len(taken) >= cap:
                break
            if i not in taken and len(set(candidates[i].nodes) - covered) >= fresh:
                taken.append(i)
                covered.update(candidates[i].nodes)
    return [candidates[i] for i in sorted(taken)], len(candidates) - len(taken)


def rating_pairs(
    observations: Sequence[Observation], *, min_score_gap: float, max_pairs_per_prompt: int, seed: int
) -> Pairing:
    """Pairs from scalar ratings: scores become z-scores per rater, a response's score is the mean z of its
    ratings, and two responses to one prompt pair when their scores differ by at least ``min_score_gap`` (and by
    more than 0). The margin is that difference; ``scores`` carries both sides' normalised scores."""
    if not math.isfinite(min_score_gap) or min_score_gap < 0:
        raise ValueError(f"min_score_gap must be a finite number >= 0, got {min_score_gap}")
    out = Pairing()
    z = zscores(observations)
    for key, (prompt, responses) in _group(observations, z).items():
        score = [math.fsum(r.values) / len(r.values) for r in responses]
        found: list[Candidate] = []
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                gap = score[i] - score[j]
                if gap == 0 or abs(gap) < min_score_gap:
                    out.stats["pairs_below_gap"] += 1
                    continue
                c, r = (i, j) if gap > 0 else (j, i)
                pair = _pair(
                    prompt,
                    responses[c].text,
                    responses[r].text,
                    abs(gap),
                    scores={"chosen": score[c], "rejected": score[r]},
                    **_sides(responses[c], responses[r]),
                )
                found.append(Candidate(pair, list(responses[c].units), list(responses[r].units), (c, r)))
        kept, dropped = cap_pairs(found, max_pairs_per_prompt, seed, key)
        out.stats["pairs_capped"] += dropped
        out.candidates.extend(kept)
        _explain_unpaired(out, responses, kept, found, "ratings", min_score_gap)
    return out


def _explain_unpaired(
    out: Pairing,
    responses: list[_Response],
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


def binary_pairs(observations: Sequence[Observation], *, max_pairs_per_prompt: int, seed: int) -> Pairing:
    """Pairs from thumbs up/down: within a prompt, every up-voted response over every down-voted one, capped at
    ``max_pairs_per_prompt`` per prompt (seeded). A response voted both ways takes the majority; the outvoted
    rows (all of them on a draw) are rejected as ``contradiction``."""
    out = Pairing()
    for key, (prompt, responses) in _group(observations, [o.value for o in observations]).items():
        ups: list[int] = []
        downs: list[int] = []
        for n, response in enumerate(responses):
            votes = Counter(response.values)
            up, down = votes.get(1.0, 0), votes.get(0.0, 0)
            if up and down:
                majority = 1.0 if up > down else 0.0 if down > up else None
                for unit, value in zip(response.units, response.values, strict=True):
                    if value != majority:
                        out.rejected[unit] = (
                            "contradiction",
                            f"the same response got {up} up and {down} down votes"
                            + ("" if majority is None else "; this row is outvoted"),
                        )
                keep = [i for i, v in enumerate(response.values) if v == majority]
                response.units = [response.units[i] for i in keep]
                response.values = [response.values[i] for i in keep]
                response.metas = [response.metas[i] for i in keep]
                response.sources = [response.sources[i] for i in keep]
                if majority is None:
                    continue
            (ups if response.values[0] == 1.0 else downs).append(n)
        found = [
            Candidate(
                _pair(
                    prompt, responses[u].text, responses[d].text, None, **_sides(responses[u], responses[d])
                ),
                list(responses[u].units),
                list(responses[d].units),
                (u, d),
            )
            for u in ups
            for d in downs
        ]
        kept, dropped = cap_pairs(found, max_pairs_per_prompt, seed, key)
        out.stats["pairs_capped"] += dropped
        out.candidates.extend(kept)
        _explain_unpaired(out, responses, kept, found, "labels", 0.0)
    return out
