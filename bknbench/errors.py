"""The one error type of bad user input, below every other module (it imports no bknbench
module), and the hint that goes with an unknown name."""
import difflib
from typing import Iterable


class ConfigError(ValueError):
    """Bad user input: the CLI prints the message on one line and exits with status 2."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """" (did you mean 'gn'?)" for the closest of `choices` to an unknown `word` (case
    ignored: "BN" finds "bn"), or "" when none is close."""
    choices = list(choices)
    lower = {c.lower(): c for c in choices}
    if word.lower() in lower:
        return f" (did you mean {lower[word.lower()]!r}?)"
    close = difflib.get_close_matches(word.lower(), list(lower), n=3, cutoff=0.5)
    if not close:
        return ""
    best = min(close, key=lambda c: _edits(word.lower(), c))  # resnet21: resnet20, not 32
    return f" (did you mean {lower[best]!r}?)"


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions from a to b."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]
