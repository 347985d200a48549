"""The behaviour contract can be followed from every place that cites it.

Code, tests and docs cite docs/BEHAVIOUR.md by section number ("BEHAVIOUR §4.5"). A section renamed,
renumbered or removed would leave those citations pointing nowhere, and a citation of the original
specification or of research notes kept outside the repository cannot be followed by a person who clones
it. These tests read every text file of the repository and fail, naming file and line, on either.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BEHAVIOUR = ROOT / "docs" / "BEHAVIOUR.md"
THIS_FILE = Path(__file__).resolve()

# Where the walk never goes when git cannot list the files (shared installs, caches, generated output).
_SKIP_DIRS = {
    ".git",
    ".venv",
    ".venv-infra",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".python_packages",
    ".sandbox",
}
_MAX_BYTES = 2 * 1024 * 1024

_NUMBER = r"\d+(?:\.\d+)*"
# "BEHAVIOUR §4.5", "docs/BEHAVIOUR.md §4.6", and chains that follow one: "BEHAVIOUR §2, §4 and §7".
_CITATION = re.compile(rf"BEHAVIOUR(?:\.md)?\s*§\s*{_NUMBER}(?:\s*(?:,|/|and|or|to)\s*§\s*{_NUMBER})*")
_SECTION = re.compile(rf"§\s*({_NUMBER})")
# A heading that opens a numbered section: "## 4. Sync rules", "### 4.5 Guarantees", "#### 4.3.1 …".
_HEADING = re.compile(rf"^#{{1,6}}\s+({_NUMBER})\.?\s+\S", re.MULTILINE)
# Citations that cannot be followed from a clone: the original specification by section, and the
# research notes that lived beside it. Written so that this file's own source does not match them.
_OUTSIDE = {
    "old-spec": re.compile(r"\bSPEC(?:\.md)?\s*(?:§|section\s+\d)"),
    "research-note": re.compile(
        r"\bresearch/[\w.-]+\.(?:md|json)\b|\b(?:graph_api|bc_al_sync|tooling|peers)\.md\s*§"
    ),
    "machine-path": re.compile(r"/work/shared\b"),
}
_FIX = {
    "old-spec": "cites a section of the old specification: cite BEHAVIOUR §x",
    "research-note": "cites a research note outside the repository: cite the public source or docs/API_NOTES.md",
    "machine-path": "names a path on a development machine",
}


@dataclass(frozen=True)
class Citation:
    path: str
    line: int
    section: str


def sections(markdown: str) -> set[str]:
    """The section numbers the document's headings open."""
    return set(_HEADING.findall(markdown))


def citations(text: str, path: str = "<text>") -> list[Citation]:
    """Every section number cited as BEHAVIOUR §x in a text, with its line."""
    found = []
    for match in _CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.extend(Citation(path, line, number) for number in _SECTION.findall(match.group()))
    return found


def _repo_files() -> list[Path]:
    """Tracked and new (not ignored) files; a plain walk where git is not available."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode("utf-8")
        paths = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
            paths.extend(Path(folder) / f for f in files)
    return [p for p in paths if p.is_file() and not p.is_symlink()]


def _texts() -> list[tuple[str, str]]:
    texts = []
    for path in _repo_files():
        if path.stat().st_size > _MAX_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images and other binaries cite nothing
        texts.append((path.relative_to(ROOT).as_posix(), text))
    return texts


TEXTS = _texts()


def test_the_contract_keeps_the_original_section_numbers():
    have = sections(BEHAVIOUR.read_text(encoding="utf-8"))
    kept = {"1", "2", "3", "4", "5", "6", "7", "4.1", "4.2", "4.3", "4.4", "4.5", "4.6"}
    kept |= {f"1.{n}" for n in range(1, 12)}
    assert kept <= have, f"missing sections: {sorted(kept - have)}"


def test_every_behaviour_citation_resolves_to_a_heading():
    have = sections(BEHAVIOUR.read_text(encoding="utf-8"))
    cited = [c for path, text in TEXTS for c in citations(text, path)]
    assert len(cited) >= 30, "the scan found too few citations to be reading the repository"
    broken = [f"{c.path}:{c.line}: BEHAVIOUR §{c.section}" for c in cited if c.section not in have]
    assert not broken, "citations of sections docs/BEHAVIOUR.md does not have:\n" + "\n".join(broken)


def test_section_numbers_are_unique():
    numbers = _HEADING.findall(BEHAVIOUR.read_text(encoding="utf-8"))
    assert len(numbers) == len(set(numbers)), sorted(n for n in numbers if numbers.count(n) > 1)


@pytest.mark.parametrize("what", sorted(_OUTSIDE))
def test_nothing_cites_what_a_clone_cannot_open(what):
    pattern = _OUTSIDE[what]
    hits = [
        f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
        for path, text in TEXTS
        if (ROOT / path).resolve() != THIS_FILE
        for m in pattern.finditer(text)
    ]
    assert not hits, f"{_FIX[what]}:\n" + "\n".join(hits)


def test_readme_links_the_contract():
    assert "](docs/BEHAVIOUR.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


# The scanner itself, on texts made up for the purpose: a scanner that finds nothing would pass the
# tests above for any repository.
def test_the_scanner_reads_citations_and_headings():
    doc = "# Title\n## 4. Rules\n### 4.5 Guarantees\n#### 4.3.1 BC\n## 10. Logs\n"
    assert sections(doc) == {"4", "4.5", "4.3.1", "10"}
    text = "x\n# see BEHAVIOUR §4.5 and docs/BEHAVIOUR.md §4.3.1.\nstore (BEHAVIOUR §2, §4, §5 and §7)\n"
    assert [(c.line, c.section) for c in citations(text)] == [
        (2, "4.5"),
        (2, "4.3.1"),
        (3, "2"),
        (3, "4"),
        (3, "5"),
        (3, "7"),
    ]
    assert {c.section for c in citations(text)} - sections(doc) == {"2", "5", "7"}


def test_the_scanner_recognises_citations_a_clone_cannot_follow():
    samples = {
        # Split so that the rename's sed (see the commit that renamed the citations) leaves them alone.
        "old-spec": "see SPEC " + "§4.5; infra: SPEC sec" + "tion 6",
        "research-note": "(research/" + "graph_api.md) and graph_api.md " + "§3",
        "machine-path": "/work/" + "shared/SPEC.md",
    }
    for what, sample in samples.items():
        assert _OUTSIDE[what].search(sample), what
    # Names that only look alike are not citations.
    assert not _OUTSIDE["old-spec"].search('SPEC["paths"]')
