"""agent._verify.version_at_least: a release's runtime minimum against the device's runtime version."""

from __future__ import annotations

import pytest

from agent._verify import version_at_least


@pytest.mark.parametrize(("have", "need", "enough"), [
    ("2.14.0", "2.14.0", True),
    ("2.14", "2.14.0", True),          # a missing part is zero
    ("2.14.0rc1", "2.14.0", True),     # the release part counts: a device's pre-release build of 2.14.0
    ("2.14.0+local", "2.14.0", True),
    ("v2.15", "2.14.0", True),
    ("2.13.9", "2.14.0", False),
    ("2.3.0", "2.14.0", False),        # numerically, not as text ("2.3" > "2.14" as strings)
    ("10.0", "9.9", True),
    ("nonsense", "2.14.0", False),     # unparsable: never enough
    ("2.14.0", "junk", False),
])
def test_version_at_least(have: str, need: str, enough: bool) -> None:
    assert version_at_least(have, need) is enough
