"""TEST-ONLY fault injection: deliberate privacy bugs that an audit must catch.

`fedsim audit` is a test of fedsim itself: each fault below is a realistic bug in the code
that clips, noises or accounts, and `tests/privacy/test_audit.py` checks that the one-run
audit's lower bound exceeds the accountant's upper bound when one is switched on.

The switch is the environment variable ``FEDSIM_TEST_FAULT`` (one name of `FAULTS`), read
at the engines' clip and noise points and in the accountant. It is deliberately NOT a config
key: no experiment file, ``--set`` or run config can reach it, and a value that names no
fault is an error rather than silently ignored. Never set it outside the audit tests.
"""

from __future__ import annotations

import os

FAULT_ENV = "FEDSIM_TEST_FAULT"

FAULTS = {
    "noise_div10": "DP-SGD noise std divided by 10 (the accountant still sees sigma)",
    "no_clip": "per-sample clipping off (the noise still scales with max_grad_norm)",
    "empty_batch_no_noise": "no noise on a step whose Poisson batch drew nothing",
    "accountant_half_q": "the accountant is told q/2 instead of the sample rate q",
    "user_noise_by_replies": "user-level noise divided by the replies instead of the expected cohort",
}


def active_fault() -> str | None:
    """The fault switched on, or None (the normal case)."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    if value not in FAULTS:
        raise RuntimeError(f"{FAULT_ENV}: must be one of {', '.join(FAULTS)} (got {value!r}); it is a test-only switch")
    return value


def fault(name: str) -> bool:
    """Whether the test-only fault `name` is on."""
    return os.environ.get(FAULT_ENV) is not None and active_fault() == name
