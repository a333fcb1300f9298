"""Every document the code cites is in the repository (``docs/``), and the architecture page
describes the modules it names."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["core", "storage", "inference", "export", "pipeline", "node", "api", "nnunet_node"]
CITED = re.compile(r"docs/[\w\-./]+\.md")
OUTSIDE = re.compile(r"\b(DESIGN\.md|REFERENCE\.md|FACTS\.md|STYLE\.md|seed document|seed/)")


def _sources() -> list[Path]:
    files = [p for folder in FOLDERS for p in (ROOT / folder).glob("*.py")]
    files += [p for folder in FOLDERS for p in (ROOT / folder).glob("*/*.py")]
    files += list((ROOT / "tests").rglob("*.py")) + list((ROOT / "bench").glob("*.py"))
    return sorted(p for p in set(files) if p.name != "test_docs.py")


def test_cited_documents_exist_and_none_lies_outside_the_repository() -> None:
    cited: dict[str, list[str]] = {}
    outside: list[str] = []
    for path in _sources():
        text = path.read_text()
        for match in CITED.finditer(text):
            cited.setdefault(match.group(0), []).append(str(path.relative_to(ROOT)))
        outside += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert outside == []
    assert {"docs/architecture.md", "docs/reference-contract.md", "docs/facts.md"} <= set(cited)
    missing = {doc: where for doc, where in cited.items() if not (ROOT / doc).is_file()}
    assert missing == {}


def test_the_architecture_names_modules_that_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    module = r"`((?:core|storage|inference|export|pipeline|node|api)/\w+\.py)`"
    named = set(re.findall(module, text))
    assert len(named) >= 10
    assert sorted(n for n in named if not (ROOT / n).is_file()) == []
