"""How the ``preftune`` command talks: help text wrapped to the terminal with its indents kept, and a "did you
mean" for a mistyped command, pipeline or parameter name."""

from __future__ import annotations

import argparse
import difflib
import textwrap
from collections.abc import Iterable


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` did you mean 'x' or 'y'?`` for the closest candidates (empty when nothing is close)."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not close:
        # a word of a longer name ("learning_rate" for "dpo_learning_rate") is close too
        close = sorted(c for c in candidates if len(name) >= 4 and name in c)[:3]
    if not close:
        return ""
    return " did you mean " + " or ".join(repr(c) for c in close) + "?"


class WrappedHelp(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs wrapped to the terminal, each line keeping its own indent.

    Each line of the text is a paragraph: it is wrapped at the terminal's width, and its continuation lines get
    its indent (plus two spaces for a parameter's header line), so a parameter's description stays under it.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip():
                lines.append("")
                continue
            lead = indent + line[: len(line) - len(line.lstrip())]
            more = lead + ("      " if line.startswith("  ") and not line.startswith("      ") else "")
            lines += textwrap.wrap(
                line.strip(),
                width=max(width, 40),
                initial_indent=lead,
                subsequent_indent=more,
                break_on_hyphens=False,  # names like preftune-mlflow or dr_grpo stay whole
            )
        return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose "invalid choice" error suggests the closest valid one."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", WrappedHelp)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            hint = did_you_mean(str(value), map(str, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices}).{hint}")
        super()._check_value(action, value)
