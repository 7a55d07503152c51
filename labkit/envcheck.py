"""Is the lab's environment complete? One [OK]/[FAIL] line per dependency in pyproject.toml.

The list is read from labkit's installed metadata, so it is the one list in pyproject.toml,
never a copy that drifts:

    >>> rows = check_environment()                     # doctest: +SKIP
    >>> print(format_report(rows))                     # doctest: +SKIP
    [OK]   torch           2.13.0+cpu   (wants >=2.4,<2.15)
    ...
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from packaging.requirements import Requirement


@dataclass
class DependencyStatus:
    name: str
    wanted: str           # the version specifier from pyproject.toml
    installed: str | None
    ok: bool


def lab_requirements(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    """labkit's declared dependencies (plus the given extras), from its package metadata."""
    reqs = []
    for line in metadata.requires("labkit") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            reqs.append(req)
    return reqs


def check_environment(extras: tuple[str, ...] = ("dev",)) -> list[DependencyStatus]:
    rows = []
    for req in lab_requirements(extras):
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            version = None
        ok = version is not None and req.specifier.contains(version, prereleases=True)
        rows.append(DependencyStatus(req.name, str(req.specifier), version, ok))
    return rows


def format_report(rows: list[DependencyStatus]) -> str:
    lines = [f"{'[OK]' if r.ok else '[FAIL]':6s} {r.name:18s} {r.installed or 'missing':14s} "
             f"(wants {r.wanted or 'any'})" for r in rows]
    bad = [r.name for r in rows if not r.ok]
    lines.append(f"{len(rows) - len(bad)}/{len(rows)} dependencies OK"
                 + (f"; fix with `make setup` (missing or wrong: {', '.join(bad)})" if bad else ""))
    return "\n".join(lines)


def main() -> int:
    rows = check_environment()
    print(format_report(rows))
    return 0 if all(r.ok for r in rows) else 1
