"""A session's workspace: the one directory the model's tools may touch, and how.

Every path a model names goes through `Workspace.resolve` before any file is
opened. Confinement is decided on the real location (symlinks followed), and
permission rules are matched on the real, root-relative path parts, so an
in-workspace symlink cannot lend a read-only file write access, and rule
`docs` never covers `docs2`.

Refusals raise `ToolDenied` with a reason worded for the model: it goes back
as the tool result, and a model can only correct itself if it is told what
was wrong.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

from threadline import errors

Permission = Literal["read", "write"]


class ToolDenied(Exception):
    """A tool call the workspace refuses; `reason` is meant for the model to read.

    Not a ThreadlineError: it never leaves the executor, it becomes a tool result."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PermissionRule:
    """What the tools may do under `path` ("write" implies read)."""

    #: Relative to the workspace root; "" or "." is the whole workspace.
    path: str
    permission: Permission


@dataclass(frozen=True)
class WriteOutcome:
    path: Path
    bytes_written: int
    created: bool


def format_size(n: int) -> str:
    """Decimal units, one decimal place: what a model (or a person) reads at a glance."""
    if n < 1000:
        return f"{n} bytes"
    if n < 1_000_000:
        return f"{n / 1e3:.1f} KB"
    if n < 1_000_000_000:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.1f} GB"


class Workspace:
    """A directory the tools are confined to, with allow rules per sub-path."""

    def __init__(
        self,
        root: Path,
        rules: Sequence[PermissionRule],
        *,
        max_file_bytes: int = 1_000_000,
    ) -> None:
        if max_file_bytes <= 0:
            raise errors.InvalidArgument(f"max_file_bytes must be positive, got {max_file_bytes}")
        root.mkdir(parents=True, exist_ok=True)
        #: Canonical (symlink-free) root: every containment check compares against it.
        self.root = root.resolve(strict=True)
        # The root as configured, which may itself sit behind a symlink (e.g. /tmp on
        # macOS): absolute paths the model copies from it must still count as inside.
        self._given_root = Path(os.path.normpath(root.absolute()))
        self.max_file_bytes = max_file_bytes
        self.rules = tuple(rules)
        # Keyed by parts so "docs", "docs/" and "./docs" are one rule; for two rules on
        # the same path the later one wins, as with any layered config.
        by_parts: dict[tuple[str, ...], PermissionRule] = {}
        for rule in self.rules:
            by_parts[_rule_parts(rule)] = rule
        self._rules = sorted(by_parts.items(), key=lambda item: len(item[0]), reverse=True)

    # -- path resolution -------------------------------------------------------------

    def resolve(self, path: str, need: Permission) -> Path:
        """The real path `path` names, if it is inside the workspace and `need` is granted.

        Raises ToolDenied otherwise. Relative paths are taken from the root;
        absolute paths are accepted only inside the root.
        """
        if "\x00" in path:
            raise ToolDenied(f"path {path!r} contains a NUL character")
        parts = self._lexical_parts(path)
        lexical = self.root.joinpath(*parts)

        # Check each existing component, not just the end result, so the reason can
        # name the symlink that escapes (and a loop is caught where it starts).
        current = self.root
        for part in parts:
            current = current / part
            if current.is_symlink() and not self._is_inside(self._real(current, path)):
                raise ToolDenied(
                    f"'{path}' goes through the symlink '{self.display(current)}', "
                    "which points outside the workspace"
                )
        resolved = self._real(lexical, path)
        if not self._is_inside(resolved):
            raise ToolDenied(f"'{path}' resolves to a location outside the workspace")

        if need == "write" and lexical.is_symlink():
            # Writing through a link would change a file under another name (and
            # another rule); the model should name the real file.
            raise ToolDenied(
                f"'{path}' is a symlink to '{self.display(resolved)}'; write to that path instead"
            )
        self._check_rules(path, resolved.relative_to(self.root).parts, need)
        return resolved

    def display(self, path: str | os.PathLike[str]) -> str:
        """A path as the model should see it: relative to the root, "." for the root."""
        p = Path(path)
        for base in (self.root, self._given_root):
            try:
                rel = p.relative_to(base)
            except ValueError:
                continue
            return rel.as_posix() if rel.parts else "."
        # Never hand out absolute locations outside the workspace.
        return p.name

    def check_size(self, path: str, size: int) -> None:
        if size > self.max_file_bytes:
            raise ToolDenied(
                f"'{path}' is {format_size(size)}; the limit is {format_size(self.max_file_bytes)}"
            )

    # -- file access -----------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        """The whole file, if readable here and within the size limit."""
        target = self.resolve(path, "read")
        # O_NOFOLLOW: if the file was swapped for a symlink after `resolve`, fail
        # rather than follow it. O_NONBLOCK: opening a FIFO must not hang the tool.
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(
                    errno.EISDIR, "is a directory (use list_dir to see what it holds)", str(target)
                )
            if not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(target))
            self.check_size(path, info.st_size)
            chunks: list[bytes] = []
            remaining = self.max_file_bytes + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        # The file may have grown between fstat and read.
        self.check_size(path, len(data))
        return data

    def write_bytes(self, path: str, data: bytes) -> WriteOutcome:
        """Replace (or create) the file atomically: readers see the old or the new file."""
        if len(data) > self.max_file_bytes:
            raise ToolDenied(
                f"the content for '{path}' is {format_size(len(data))}; "
                f"the limit is {format_size(self.max_file_bytes)}"
            )
        target = self.resolve(path, "write")
        if target == self.root:
            raise IsADirectoryError(errno.EISDIR, "is the workspace directory", str(target))
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        # Re-check now that the directories exist: a link swapped in since `resolve`
        # shows up here. From here on every step is relative to the opened directory
        # (O_NOFOLLOW refuses a parent that became a symlink), so the file lands in
        # the directory that was checked. A swap of a higher component in between
        # needs a concurrent writer inside the workspace, which is outside this model.
        if not self._is_inside(self._real(parent, path)):
            raise ToolDenied(f"'{path}' resolves to a location outside the workspace")
        dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return WriteOutcome(target, len(data), self._replace_in(dir_fd, target, path, data))
        finally:
            os.close(dir_fd)

    def _replace_in(self, dir_fd: int, target: Path, path: str, data: bytes) -> bool:
        name = target.name
        try:
            existing: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if stat.S_ISLNK(existing.st_mode):
                raise ToolDenied(f"'{path}' is a symlink; write to the file it points to instead")
            if stat.S_ISDIR(existing.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", str(target))
        # A hidden, unguessable sibling: same filesystem, so os.replace is atomic.
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o666, dir_fd=dir_fd)
        try:
            try:
                if existing is not None:
                    os.fchmod(fd, stat.S_IMODE(existing.st_mode))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                # Without fsync a crash right after the rename can leave an empty file.
                os.fsync(fd)
            finally:
                os.close(fd)
            # Replaces the directory entry itself: a symlink planted at the target
            # since the check above is overwritten, never followed.
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return existing is None

    # -- internals -------------------------------------------------------------------

    def _lexical_parts(self, path: str) -> tuple[str, ...]:
        """Root-relative parts with `.` and `..` folded, refusing anything that leaves.

        Folding `..` before the filesystem sees it means `link/../x` names `<root>/x`,
        whatever `link` points to: stricter than POSIX, never looser.
        """
        if path in ("", "."):
            return ()
        normalized = os.path.normpath(path)
        if os.path.isabs(normalized):
            for base in (self.root, self._given_root):
                try:
                    return PurePath(normalized).relative_to(base).parts
                except ValueError:
                    continue
            raise ToolDenied(
                f"'{path}' is outside the workspace; use a path relative to the "
                f"workspace root ({self.root})"
            )
        if normalized == os.pardir or normalized.startswith(os.pardir + os.sep):
            raise ToolDenied(f"path '{path}' leaves the workspace")
        return PurePath(normalized).parts

    def _real(self, path: Path, shown: str) -> Path:
        try:
            return path.resolve(strict=False)
        except (RuntimeError, OSError):
            # 3.11 raises RuntimeError on a symlink loop; later versions OSError(ELOOP).
            # The exception text holds host paths, which mean nothing to the model.
            raise ToolDenied(f"'{shown}' cannot be resolved (a symlink loop?)") from None

    def _is_inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def _rule_for(self, parts: tuple[str, ...]) -> PermissionRule | None:
        # Longest prefix first, compared part by part: rule "docs" covers
        # "docs/a.md" but not "docs2/a.md".
        for rule_parts, rule in self._rules:
            if parts[: len(rule_parts)] == rule_parts:
                return rule
        return None

    def _check_rules(self, path: str, parts: tuple[str, ...], need: Permission) -> None:
        rule = self._rule_for(parts)
        if rule is None:
            raise ToolDenied(
                f"'{path}' is not accessible here (no rule covers it; {self._describe_rules()})"
            )
        if need == "write" and rule.permission != "write":
            raise ToolDenied(
                f"'{path}' is read-only here (rule: path '{rule.path or '.'}', {rule.permission})"
            )

    def _describe_rules(self) -> str:
        if not self.rules:
            return "no paths are accessible in this workspace"
        shown = [f"'{r.path or '.'}' {r.permission}" for r in self.rules[:10]]
        more = f" and {len(self.rules) - 10} more" if len(self.rules) > 10 else ""
        return "accessible paths: " + ", ".join(shown) + more


def _rule_parts(rule: PermissionRule) -> tuple[str, ...]:
    normalized = os.path.normpath(rule.path) if rule.path else os.curdir
    if (
        os.path.isabs(normalized)
        or normalized == os.pardir
        or normalized.startswith(os.pardir + os.sep)
    ):
        # A rule is configuration: a bad one should stop startup, not quietly grant
        # (or deny) something else.
        raise errors.InvalidArgument(
            f"permission rule path {rule.path!r} must be relative to the workspace root "
            "and stay inside it"
        )
    if rule.permission not in ("read", "write"):
        raise errors.InvalidArgument(
            f"permission rule for {rule.path!r}: permission must be 'read' or 'write', "
            f"got {rule.permission!r}"
        )
    return PurePath(normalized).parts
