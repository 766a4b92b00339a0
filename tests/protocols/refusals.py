"""What the machines' property tests share: a count of the verdicts they saw, by reason."""

from __future__ import annotations

from collections import Counter


def report(name: str, seen: Counter[str], expected: set[str]) -> None:
    """Print the verdicts seen by reason (``pytest -s``) and fail if an expected reason never came up."""
    print(f"\n{name}: {sum(seen.values())} verdicts")
    for reason, count in seen.most_common():
        print(f"  {count:6d}  {reason}")
    reasons = {r.split(" ")[-1] for r in seen}
    assert expected <= reasons, expected - reasons
