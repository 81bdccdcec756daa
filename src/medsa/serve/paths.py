"""Confinement of every file the web app reads or writes to folders chosen at start-up.

The browser only ever names files as ``(root index, relative POSIX path)``. A path is accepted when
it is relative, has no ``..`` / NUL / backslash / drive component, and still lies inside the root
after ``Path.resolve()`` (which follows symlinks), so a symlink that points out of a root is
refused like ``..`` would be.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medsa.errors import MedsaError

__all__ = [
    "IMAGE_SUFFIXES",
    "AccessDenied",
    "NotFound",
    "RootSet",
    "image_suffix",
    "safe_output_name",
]

#: file name endings the browser lists and the upload endpoint accepts (DICOM folders excluded:
#: a browser upload is one file)
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".nii",
    ".nii.gz",
    ".mha",
    ".nrrd",
    ".dcm",
)


class AccessDenied(MedsaError):
    """A path that would leave the allowed folders (HTTP 403)."""


class NotFound(MedsaError):
    """A path inside the allowed folders that does not exist (HTTP 404)."""


def image_suffix(name: str) -> str | None:
    """The recognised image suffix of ``name`` (lower case, ``.nii.gz`` as one), or ``None``."""
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf) and len(low) > len(suf):
            return suf
    return None


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def safe_output_name(name: str) -> str:
    """Validate a file name chosen by the browser for a saved mask.

    Only ``[A-Za-z0-9._-]``, no leading dot, no separators: the name can never address anything but
    a plain file directly inside the output folder.

    Raises:
        AccessDenied: the name contains anything else.
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise AccessDenied(
            f"invalid file name {name!r}: use letters, digits, '.', '_' and '-' only "
            "(no folders, no leading dot)"
        )
    return name


@dataclass(frozen=True)
class RootSet:
    """The folders the server may read from, resolved once at start-up.

    Args:
        roots: existing folders; symlinks in the root paths themselves are resolved here.
    """

    roots: tuple[Path, ...]

    @classmethod
    def from_paths(cls, paths: list[str | os.PathLike[str]] | tuple[Path, ...]) -> RootSet:
        resolved = []
        for p in paths:
            r = Path(p).expanduser().resolve()
            if not r.is_dir():
                raise MedsaError(f"--root {p}: not a folder")
            resolved.append(r)
        if not resolved:
            raise MedsaError("at least one --root folder is needed")
        return cls(tuple(resolved))

    def root(self, index: int) -> Path:
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index < len(self.roots)
        ):
            raise NotFound(f"no root folder #{index} (there are {len(self.roots)})")
        return self.roots[index]

    def resolve(self, index: int, rel: str) -> Path:
        """Map ``(root index, relative path)`` to an absolute path inside that root.

        Raises:
            AccessDenied: absolute path, ``..``, NUL, backslash, or a symlink leaving the root.
            NotFound: the root index or the path does not exist.
        """
        root = self.root(index)
        if not isinstance(rel, str):
            raise AccessDenied("path must be a string")
        if "\x00" in rel or "\\" in rel:
            raise AccessDenied(f"invalid character in path {rel!r}")
        pure = PurePosixPath(rel)
        if pure.is_absolute() or rel.startswith("~") or re.match(r"^[A-Za-z]:", rel):
            raise AccessDenied(f"absolute paths are not allowed: {rel!r}")
        if any(part == ".." for part in pure.parts):
            raise AccessDenied(f"'..' is not allowed in paths: {rel!r}")
        candidate = root.joinpath(*[p for p in pure.parts if p not in ("", ".")])
        try:
            real = candidate.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            # Do not reveal whether a target outside the root exists: check the lexical path only.
            raise NotFound(f"no such file or folder: {rel!r}") from None
        except (OSError, RuntimeError) as e:  # symlink loops, permission problems
            raise AccessDenied(f"cannot access {rel!r}: {e.__class__.__name__}") from None
        if not real.is_relative_to(root):
            raise AccessDenied(f"{rel!r} points outside the allowed folders")
        return real

    def relative(self, index: int, path: Path) -> str:
        """POSIX path of ``path`` relative to root ``index`` (``""`` for the root itself)."""
        rel = path.relative_to(self.root(index)).as_posix()
        return "" if rel == "." else rel

    def inside(self, index: int, path: Path) -> bool:
        """Whether ``path`` (after following symlinks) stays in root ``index``."""
        try:
            return path.resolve(strict=True).is_relative_to(self.root(index))
        except (OSError, RuntimeError):
            return False
