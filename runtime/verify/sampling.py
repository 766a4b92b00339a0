"""Which calls a consumer spot-checks: ``verify.sample_rate`` of them at random, always the first call to
a provider it has not checked before, and every call after a doubt (a failed or unanswered check).

The default, 0.02, comes from bench/verify.py: a full check costs about as much as the generation it
checks on small CPU models (see docs/verified-inference.md), so checking 2 % of calls costs about 2 % of
what the consumer pays when verifier time and provider time are priced alike.
"""

from __future__ import annotations

import random

DEFAULT_SAMPLE_RATE = 0.02


def should_check(*, rate: float, checked_before: bool, in_doubt: bool, rng: random.Random | None = None) -> bool:
    if not checked_before or in_doubt:
        return True
    if rate <= 0:
        return False
    return (rng or random.SystemRandom()).random() < rate
