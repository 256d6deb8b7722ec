"""Statuses are types: no status literal is compared or stored outside its enum (controlplane.statuses and the
Flower run report's status, federated.flower.config.RunReportStatus).

An AST scan of the control plane and the Flower apps for a known status value written as a string where a status is
compared (``x.status == "running"``, ``report.get("status") in ("completed", "failed")``), passed
(``status="failed"``), assigned (``record.status = "ready"``) or put in a dict under ``"status"``.
"""

from __future__ import annotations

import ast
import enum
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import statuses
from federated.burst.spec import WorkerOutcome
from federated.flower.config import RunReportStatus

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "controlplane", ROOT / "federated" / "flower", ROOT / "federated" / "burst"]
SKIPPED = {ROOT / "controlplane" / "statuses.py"}  # where the values are declared
SKIPPED_DIRS = {ROOT / "controlplane" / "db" / "migrations"}  # frozen history: migrations keep their literals

STATUS_VALUES = frozenset(
    member.value
    for enum_type in [*(getattr(statuses, name) for name in statuses.__all__), RunReportStatus, WorkerOutcome]
    if isinstance(enum_type, type) and issubclass(enum_type, enum.StrEnum)
    for member in enum_type
)
# Strings that are status values by coincidence, where they are not any lifecycle's status: (file, value, why).
NOT_LIFECYCLES = {
    ("controlplane/app.py", "ok"): "GET /healthz answers its own status, ok | degraded",
}


def _strings(node: ast.AST) -> Iterator[str]:
    """The string constants an expression may evaluate to: a constant, either branch of `a if c else b`, the
    members of a tuple, list or set literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.IfExp):
        yield from _strings(node.body)
        yield from _strings(node.orelse)
    elif isinstance(node, ast.Tuple | ast.List | ast.Set):
        for element in node.elts:
            yield from _strings(element)


def _is_status(node: ast.AST) -> bool:
    """`status`, `x.status`, `x["status"]`, `x.get("status")`, or a tuple of targets holding one of them."""
    if isinstance(node, ast.Name):
        return node.id == "status"
    if isinstance(node, ast.Attribute):
        return node.attr == "status"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "status"
    if isinstance(node, ast.Call):
        func, args = node.func, node.args
        return (isinstance(func, ast.Attribute) and func.attr == "get" and bool(args)
                and isinstance(args[0], ast.Constant) and args[0].value == "status")
    if isinstance(node, ast.Tuple):
        return any(_is_status(element) for element in node.elts)
    return False


def status_literals(source: str) -> list[tuple[int, str]]:
    """(line, value) of every status value written as a literal where a status is compared or stored."""
    found: list[tuple[int, str]] = []

    def check(line: int, expression: ast.AST) -> None:
        found.extend((line, value) for value in _strings(expression) if value in STATUS_VALUES)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_status(operand) for operand in operands):
                for operand in operands:
                    check(node.lineno, operand)
        elif isinstance(node, ast.keyword) and node.arg == "status":
            check(node.value.lineno, node.value)
        elif isinstance(node, ast.Assign) and any(_is_status(target) for target in node.targets):
            check(node.lineno, node.value)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and _is_status(node.target) and node.value is not None:
            check(node.lineno, node.value)
            if isinstance(node.value, ast.Call):  # a table column: Field(default=...)
                for keyword in node.value.keywords:
                    if keyword.arg == "default":
                        check(node.lineno, keyword.value)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "status":
                    check(value.lineno, value)
    return sorted(set(found))


def _scanned_files() -> Iterator[Path]:
    for root in SCANNED:
        for path in sorted(root.rglob("*.py")):
            if path not in SKIPPED and not any(path.is_relative_to(d) for d in SKIPPED_DIRS):
                yield path


def test_the_scan_finds_each_kind_of_status_literal() -> None:
    # Arrange: one of each form the scan must catch, and lookalikes it must leave alone
    source = '''
if job.status == "running": pass
if report.get("status") in ("completed", "failed"): pass
if "succeeded" != row["status"]: pass
record.status, record.reason = "failed", reason
status: str = Field(default="pending")
update(CommandRecord).values(status="ok" if ack.ok else "error")
report = {"status": "running"}
if worker.state == "running": pass
if response.status_code == 200: pass
log.info("job.finished", reason="failed")
'''
    # Act
    found = status_literals(source)
    # Assert
    assert found == [(2, "running"), (3, "completed"), (3, "failed"), (4, "succeeded"), (5, "failed"),
                     (6, "pending"), (7, "error"), (7, "ok"), (8, "running")]


def test_the_known_values_cover_every_lifecycle() -> None:
    assert {"pending", "running", "succeeded", "failed", "queued", "timed_out", "ok", "error", "building", "ready",
            "completed"} <= STATUS_VALUES


@pytest.mark.parametrize("path", list(_scanned_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_status_literal_outside_its_enum(path: Path) -> None:
    # Act
    relative = str(path.relative_to(ROOT))
    found = [(line, value) for line, value in status_literals(path.read_text())
             if (relative, value) not in NOT_LIFECYCLES]
    # Assert: use the member of the status's enum (controlplane.statuses) instead
    assert found == []
