from __future__ import annotations

from pathlib import Path

import pytest

from nnunet_node.core.errors import PathNotAllowed
from nnunet_node.core.paths import resolve_inside


def test_inside_and_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "study").mkdir(parents=True)
    assert resolve_inside(root / "study", [root]) == (root / "study").resolve()
    assert resolve_inside("study", [root], base=root) == (root / "study").resolve()
    with pytest.raises(PathNotAllowed, match="study_path"):
        resolve_inside(root / ".." / "elsewhere", [root], field="study_path")
    with pytest.raises(PathNotAllowed):
        resolve_inside("/etc/passwd", [root])
    with pytest.raises(PathNotAllowed):
        resolve_inside("../x", [root], base=root)


def test_link_out_of_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(PathNotAllowed):
        resolve_inside(root / "link" / "file", [root])


def test_prefix_sibling_is_not_inside(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    with pytest.raises(PathNotAllowed):
        resolve_inside(tmp_path / "data2", [tmp_path / "data"])
