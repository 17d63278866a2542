"""Opening paths under a directory without ever reaching outside it, even while
something else renames directories and plants symlinks inside it.

A path checked as a string and then opened by name can change in between (a
directory swapped for a symlink), and O_NOFOLLOW guards only the last
component. So nothing here opens a path as a whole. Where the kernel has
openat2(2) (Linux 5.6+), a path is opened relative to the root's descriptor with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS: the kernel refuses any symlink on the
way. Otherwise, and whenever that refusal says a symlink is in the way, the path
is walked one component at a time, each opened relative to its parent's
descriptor with O_NOFOLLOW. A symlink met on the way is read, never followed by
the kernel: its target is joined to the link's own (real) location and resolved
again from the root, so a link pointing inside works as it always did and one
that leaves is refused, by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: openat2's number in the generic syscall table, which x86_64 and aarch64 share.
_SYS_OPENAT2 = 437
#: Symlinks one resolution may follow before it counts as a loop (the kernel's limit).
MAX_SYMLINKS = 40

Parts = tuple[str, ...]


class Escape(Exception):
    """A symlink on the way points outside the root."""

    def __init__(self, link: Parts) -> None:
        super().__init__("/".join(link))
        #: Where the symlink is, relative to the root.
        self.link = link


class SymlinkLoop(Exception):
    """More than MAX_SYMLINKS symlinks on the way."""


@dataclass(frozen=True)
class Opened:
    fd: int
    #: Where the descriptor points, relative to the root, every symlink resolved.
    parts: Parts


@dataclass(frozen=True)
class Located:
    """Where a path leads, for permission checks and messages (nothing is opened)."""

    parts: Parts
    #: The path, as named, ends in a symlink.
    ends_in_link: bool


class _Link(Exception):
    """A symlink at `at` (relative to the root); `rest` is still to be resolved after it."""

    def __init__(self, at: Parts, target: str, rest: Parts) -> None:
        super().__init__(target)
        self.at, self.target, self.rest = at, target, rest


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _find_openat2() -> Callable[[int, bytes, _OpenHow], int] | None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long

    def openat2(dir_fd: int, path: bytes, how: _OpenHow) -> int:
        # CDLL calls release the GIL: a slow disk does not stall other threads.
        return int(
            syscall(
                ctypes.c_long(_SYS_OPENAT2),
                ctypes.c_int(dir_fd),
                ctypes.c_char_p(path),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
        )

    return openat2


#: None where the kernel (or a seccomp filter) does not offer openat2: the walk alone.
_OPENAT2 = _find_openat2()
#: openat2 answers that leave the decision to the walk: a symlink or `..` in the way
#: (ELOOP, EXDEV, ENOTDIR for a final symlink opened O_DIRECTORY), or a retry.
_WALK_DECIDES = {errno.ELOOP, errno.EXDEV, errno.ENOTDIR, errno.EAGAIN, errno.EINTR}
#: openat2 missing or filtered (seccomp answers ENOSYS or EPERM), or refusing our struct.
_UNAVAILABLE = {errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG}


@dataclass(frozen=True)
class ConfinedDir:
    """A directory whose contents are opened only through it."""

    #: The directory, symlink-free (absolute symlink targets are compared with it).
    path: Path
    #: Other spellings of `path` an absolute symlink inside may use.
    aliases: tuple[PurePosixPath, ...] = ()

    def open(self, parts: Sequence[str], flags: int, *, mkdirs: bool = False) -> Opened:
        """Open `parts` (relative, no `..`) under the root; the caller closes the fd.

        Symlinks inside are followed by resolving them here; `mkdirs` creates missing
        directories on the way (and the last one when `flags` has O_DIRECTORY).
        Raises Escape, SymlinkLoop or the OSError of the open.
        """
        with self._root() as root_fd:
            fd = _kernel_open(root_fd, parts, flags, mkdirs=mkdirs)
            if fd is not None:
                return Opened(fd, tuple(parts))
            return self._walk(root_fd, tuple(parts), flags, mkdirs)

    def locate(self, parts: Sequence[str]) -> Located:
        """Where `parts` lead, symlinks resolved; parts that do not exist yet count as
        named. Advisory (for checks before creating things): what is then opened is
        resolved again by `open`."""
        todo, ends_in_link = tuple(parts), False
        with self._root() as root_fd:
            for _ in range(MAX_SYMLINKS + 1):
                try:
                    return Located(_locate_once(root_fd, todo), ends_in_link)
                except _Link as link:
                    ends_in_link = ends_in_link or not link.rest
                    todo = self._follow(link)
        raise SymlinkLoop()

    @contextlib.contextmanager
    def _root(self) -> Iterator[int]:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def _walk(self, root_fd: int, parts: Parts, flags: int, mkdirs: bool) -> Opened:
        todo = parts
        for _ in range(MAX_SYMLINKS + 1):
            try:
                return Opened(_walk_once(root_fd, todo, flags, mkdirs), todo)
            except _Link as link:
                todo = self._follow(link)
        raise SymlinkLoop()

    def _follow(self, link: _Link) -> Parts:
        """The path to resolve next: the link's target in place of the link."""
        target = PurePosixPath(link.target)
        if target.is_absolute():
            base = list(self._relative(os.path.normpath(link.target), link.at))
            steps: tuple[str, ...] = ()
        else:
            # `..` folds against the link's directory, whose parts are real (no
            # symlinks): the same answer as the kernel's, decided here.
            base, steps = list(link.at[:-1]), target.parts
        for step in steps:
            if step == "..":
                if not base:
                    raise Escape(link.at)
                base.pop()
            elif step != ".":
                base.append(step)
        return (*base, *link.rest)

    def _relative(self, target: str, link: Parts) -> Parts:
        for base in (PurePosixPath(self.path), *self.aliases):
            with contextlib.suppress(ValueError):
                return PurePosixPath(target).relative_to(base).parts
        raise Escape(link)


def _kernel_open(root_fd: int, parts: Sequence[str], flags: int, *, mkdirs: bool) -> int | None:
    """openat2 beneath the root with no symlink anywhere; None when the walk must decide."""
    global _OPENAT2
    if _OPENAT2 is None:
        return None
    how = _OpenHow(
        flags | os.O_NOFOLLOW | os.O_CLOEXEC,
        0,
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    )
    fd = _OPENAT2(root_fd, os.fsencode("/".join(parts) or "."), how)
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code in _UNAVAILABLE:
        _OPENAT2 = None
        return None
    if code in _WALK_DECIDES or (code == errno.ENOENT and mkdirs):
        return None
    raise OSError(code, os.strerror(code))


def _walk_once(root_fd: int, parts: Parts, flags: int, mkdirs: bool) -> int:
    """Open `parts` component by component, never following a symlink; _Link at the first."""
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=root_fd)
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            step = flags if last else os.O_RDONLY | os.O_DIRECTORY
            mkdir = mkdirs and bool(step & os.O_DIRECTORY)
            child = _open_step(fd, name, step, mkdir, parts[: i + 1], parts[i + 1 :])
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_step(dir_fd: int, name: str, flags: int, mkdir: bool, at: Parts, rest: Parts) -> int:
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        if not mkdir:
            raise
    except OSError as exc:
        raise _link_or(exc, dir_fd, name, at, rest) from None
    # Created here, then opened like any component: if a symlink takes its place in
    # between, the open refuses it and the link is resolved like any other.
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o777, dir_fd=dir_fd)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise _link_or(exc, dir_fd, name, at, rest) from None


def _link_or(exc: OSError, dir_fd: int, name: str, at: Parts, rest: Parts) -> Exception:
    """_Link if `name` is a symlink (O_NOFOLLOW said ELOOP, or ENOTDIR with O_DIRECTORY)."""
    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
        return exc
    try:
        return _Link(at, os.readlink(name, dir_fd=dir_fd), rest)
    except OSError:
        return exc  # not a symlink (a file where a directory was named): the open's error


def _locate_once(root_fd: int, parts: Parts) -> Parts:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        for i, name in enumerate(parts):
            at, rest = parts[: i + 1], parts[i + 1 :]
            if not rest:
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    return parts
                if stat.S_ISLNK(info.st_mode):
                    raise _Link(at, os.readlink(name, dir_fd=fd), rest)
                return parts
            try:
                child = _open_step(fd, name, os.O_RDONLY | os.O_DIRECTORY, False, at, rest)
            except FileNotFoundError:
                return parts  # the rest does not exist yet: it will be created as named
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return parts
