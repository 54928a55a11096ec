"""The unpaired set: thumbs and ratings as single desirable / undesirable answers, for KTO.

Pairing binary and rating feedback throws information away: a prompt with only thumbs up gives no pair, and a
prompt's five ratings give pairs, not five judgements. KTO learns from each judgement alone, so the import also
writes every thumb and rating that passed its row suite as ``{"prompt", "completion", "label", "meta", "source"}``
(``label`` true = desirable). A thumbs up is desirable and a thumbs down undesirable; a rating is desirable above
its rater's mean and undesirable below it (the same per-rater standardisation the rating pairs use), and a rating
exactly at the mean says neither, so it is left out. Rows go to train or eval by their prompt exactly as the pairs
do (the same seeded prompt hash, the same cut), so no held-out prompt is trained on by either set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.data import records, spill
from preftune.data.importing import rank_key


class UnpairedSet:
    """Thumbs and ratings collected while the import pairs them; :meth:`publish` writes them split by prompt."""

    def __init__(self, directory: Path, train_path: str, eval_path: str, seed: int) -> None:
        self.paths, self.seed = (train_path, eval_path), seed
        self.spill = spill.LineSpill(directory / "unpaired.spill")

    @property
    def wanted(self) -> bool:
        return bool(self.paths[0])

    def add(self, kind: str, prompt: Any, response: str, value: float, meta: Any, source: Any) -> None:
        """One accepted observation: ``value`` is a thumb (1 up, 0 down) or a rating standardised per rater."""
        if not self.wanted or (kind == "rating" and value == 0):
            return
        label = value > 0 if kind == "rating" else bool(value)
        rank = rank_key(self.seed, records.canonical_json(prompt))
        row = {"prompt": prompt, "completion": response, "label": label, "meta": meta, "source": source}
        self.spill.write(f"{rank}\t{int(label)}\t{records.dumps(row)}")

    def publish(self, cut: int) -> dict[str, float]:
        """Write train and eval: a row is held out when its prompt hash is at most ``cut``, the largest among the
        eval pairs' (-1: no pair is held out). Returns the counts."""
        if not self.wanted:
            return {}
        outputs = [spill.Output(self.paths[0]), spill.Output(self.paths[1] or self.paths[0] + ".eval")]
        desirable = 0
        try:
            for text in self.spill.read():
                rank, label, line = text.split("\t", 2)
                outputs[int(rank) <= cut].write(line)
                desirable += label == "1"
        except BaseException:
            for output in outputs:
                output.discard()
            raise
        outputs[0].publish()
        if self.paths[1]:
            outputs[1].publish()
        else:
            outputs[1].discard()
        total = outputs[0].lines + outputs[1].lines
        return {
            "unpaired_train": outputs[0].lines,
            "unpaired_eval": outputs[1].lines,
            "unpaired_desirable_fraction": desirable / total if total else 0.0,
        }
