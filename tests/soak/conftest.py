"""The soak run reuses the checks in ``tests/reliability``: let pytest explain their asserts too."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite(
    *(
        f"tests.reliability.{name}"
        for name in ("attacks", "crash", "faults", "helpers", "hostile", "load", "runner", "servers")
    )
)
