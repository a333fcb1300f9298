"""Paths from requests must stay inside the configured roots (links followed)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from nnunet_node.core.errors import PathNotAllowed


def resolve_inside(
    path: str | os.PathLike[str],
    roots: Iterable[Path],
    *,
    base: Path | None = None,
    field: str = "path",
) -> Path:
    """Resolve ``path`` (relative ones against ``base``), following links, and return it when
    it lies inside one of ``roots``; otherwise raise :class:`PathNotAllowed` naming ``field``.

    The path need not exist. Roots are resolved too, so a root that is itself a link works.
    """
    raw = Path(path).expanduser()
    if not raw.is_absolute():
        if base is None:
            raise PathNotAllowed(f"{field}: a relative path needs a base folder: {str(path)!r}")
        raw = base / raw
    resolved = raw.resolve()
    for root in roots:
        root_resolved = Path(root).expanduser().resolve()
        if resolved == root_resolved or resolved.is_relative_to(root_resolved):
            return resolved
    raise PathNotAllowed(f"{field}: {str(path)!r} is outside the allowed roots")
