"""Checks that requirements.lock pins what pyproject.toml asks for (CI, offline).

The lock (scripts/lock.sh writes it with pip-compile) pins every package the image
installs, with hashes. It matches pyproject.toml when its header records the
digest of the current `[project] dependencies` (so any change there needs a new
lock) and every dependency is pinned to a version its specifier allows.
`--digest` prints the digest for scripts/lock.sh. Exits non-zero naming each problem.
"""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
HEADER = "# pyproject-dependencies-sha256: "


def dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(spec) for spec in project["dependencies"]]


def digest() -> str:
    normalized = sorted(str(requirement) for requirement in dependencies())
    return hashlib.sha256("\n".join(normalized).encode()).hexdigest()


def problems() -> list[str]:
    if not LOCK.exists():
        return [f"{LOCK.name} is missing: run scripts/lock.sh"]
    text = LOCK.read_text()
    found = []
    headers = [line[len(HEADER) :] for line in text.splitlines() if line.startswith(HEADER)]
    if headers != [digest()]:
        found.append("pyproject.toml's dependencies changed since the lock: run scripts/lock.sh")
    pins = {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE)
    }
    unhashed = re.findall(r"^([A-Za-z0-9_.-]+==\S+)(?! \\)\s*$", text, re.MULTILINE)
    found += [f"{pin} has no hash" for pin in unhashed]
    for requirement in dependencies():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            found.append(f"{requirement.name} is not pinned in {LOCK.name}")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            found.append(f"{requirement.name}=={pinned} does not satisfy {requirement}")
    return found


def main() -> int:
    if sys.argv[1:] == ["--digest"]:
        print(digest())
        return 0
    found = problems()
    for problem in found:
        print(f"check_lock: {problem}", file=sys.stderr)
    if not found:
        print(f"check_lock: {LOCK.name} matches pyproject.toml")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
