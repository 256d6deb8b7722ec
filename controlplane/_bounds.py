"""Bounds of what the API accepts: every integer, float and string a client sends has a range.

The request schemas and the controllers' path and query parameters use these, so that out-of-range input is a
400 naming the field instead of an overflow deep in SQLite, PostgreSQL, APScheduler or the file system.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from litestar.params import Parameter

__all__ = [
    "INT64_MAX",
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_OFFSET",
    "NAME_PATTERN",
    "ROW_ID_MAX",
    "CommandIdParam",
    "Name",
    "NameParam",
    "OffsetParam",
    "RowId",
    "TaskName",
]

INT64_MAX: Final = 2**63 - 1  # SQLite INTEGER, PostgreSQL bigint
ROW_ID_MAX: Final = 2**31 - 1  # the rounds', jobs' and deployments' ids are PostgreSQL integers
MAX_OFFSET: Final = 2**31 - 1
MAX_BODY_BYTES: Final = 1024 * 1024  # larger request bodies are 413
MAX_JSON_DEPTH: Final = 32  # deeper JSON request bodies are 400 (the decoder would recurse, then fail)

# Device ids, tags, profiles, schedule ids, model versions and variants: what the database keys are made of.
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]
# A registered task's name, or the package.module:Class target it was registered with (federated.tasks).
TaskName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$", max_length=64,
                                       description="a registered task (see federated.tasks)")]

# Path and query parameters.
RowId = Annotated[int, Parameter(ge=1, le=ROW_ID_MAX, description="a row id")]
NameParam = Annotated[str, Parameter(pattern=NAME_PATTERN, max_length=64)]
CommandIdParam = Annotated[str, Parameter(pattern=r"^[A-Za-z0-9_-]{1,64}$", max_length=64)]
OffsetParam = Annotated[int, Parameter(ge=0, le=MAX_OFFSET)]
