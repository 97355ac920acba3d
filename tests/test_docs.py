"""The documentation matches the repository: every module, file and link it names exists, the README
stays a short front door with its two commands, and nothing cites material outside the repository."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]
DOCS = [p for p in DOCS if p.is_file()]

#: The two command lines CI and the users rely on, byte for byte.
COMMAND_LINES = (
    "make repro   # set everything up (.venv) and run the main job on the default CPU preset",
    "make test    # set everything up (.venv) and run the tests",
)
README_MAX_LINES = 160

#: Repository paths the docs may name although they are gone: the experiment log's history.
REMOVED = {"configs/tiny-r32.yaml"}

#: Material a user of the repository does not have (split so that this file does not match itself).
FORBIDDEN = ("DESIGN" + ".md", "DESIGN" + " §", "../" + "shared")
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".yaml", ".yml", ".json", ".txt", ".toml", ".cfg", ".ini", ".sh"}

# A repository path: starts with one of the top-level folders, not inside a longer path or name.
PATH = re.compile(r"(?<![\w./-])(?:dmdiff|docs|tests|configs|notebooks)/[\w./<>*-]*")
# A dotted dmdiff name (module, or module plus attributes), not part of a path, nor a file name
# such as dmdiff.py in a folder listing.
DOTTED = re.compile(r"(?<![\w./-])dmdiff(?:\.\w+)+(?!\w)(?<!\.py)(?<!\.json)(?<!\.md)(?<!\.yaml)")
# A markdown link or image: [text](target) or ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def mentions(pattern: re.Pattern, path: Path) -> list[str]:
    return sorted(set(m.group(0) for m in pattern.finditer(path.read_text(encoding="utf-8"))))


def module_file(name: str) -> Path | None:
    """The file of the dmdiff module ``name`` (``a.b`` → ``a/b.py`` or ``a/b/__init__.py``), or None."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def dotted_problem(name: str) -> str | None:
    """Why the dotted name ``name`` names nothing in the package, or None when it does.

    The longest prefix that is a module must exist; any rest must be attributes of it (looked up on
    the imported module: functions, classes, their methods, constants). ``__main__`` is never imported.
    """
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        module = ".".join(parts[:n])
        if module_file(module) is None:
            continue
        rest = parts[n:]
        if not rest:
            return None
        if parts[n - 1] == "__main__":
            return f"{name}: {module} is not imported here, so {'.'.join(rest)} cannot be checked"
        obj = importlib.import_module(module)
        for i, attr in enumerate(rest):
            if not hasattr(obj, attr):
                return f"{name}: {'.'.join(parts[:n + i])} has no attribute {attr!r}"
            obj = getattr(obj, attr)
        return None
    return f"{name}: no such module"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_named_paths_exist(doc):
    missing = []
    for mention in mentions(PATH, doc):
        path = mention.rstrip(".,;:)")
        if any(c in path for c in "<>*") or path in REMOVED:
            continue                      # a pattern (maps/<name>.npy, notebooks/NN_*.ipynb) or history
        if not (ROOT / path).exists() or (path.endswith("/") and not (ROOT / path).is_dir()):
            missing.append(path)
    assert not missing, f"{doc_id(doc)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_named_modules_exist(doc):
    problems = [p for p in map(dotted_problem, mentions(DOTTED, doc)) if p]
    assert not problems, f"{doc_id(doc)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                      # a URL (https:, mailto:) or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc_id(doc)} links to missing files: {broken}"


def test_readme_is_short_and_keeps_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    for command in COMMAND_LINES:
        assert command in lines, f"README.md lost the line {command!r}"


def test_nothing_cites_material_outside_the_repository():
    files = [README, ROOT / "data" / "README.md"]
    for folder in ("docs", "dmdiff", "notebooks", "tests", "configs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    found = [f"{doc_id(p)}: {s!r}" for p in files if p.is_file()
             for s in FORBIDDEN if s in p.read_text(encoding="utf-8", errors="replace")]
    assert not found, "\n".join(found)


def test_the_checks_catch_what_they_should():
    """The checkers themselves: a wrong module, attribute or path is reported, a right one is not."""
    assert dotted_problem("dmdiff.optics.blur.SpatiallyVaryingBlur") is None
    assert dotted_problem("dmdiff.evaluation") is None
    assert dotted_problem("dmdiff.no_such_module") is not None
    assert dotted_problem("dmdiff.metrics.no_such_function") is not None
    text = "see dmdiff/model/dmdiff.py, dmdiff.model.dmdiff.DMDiff and [x](docs/method.md)."
    assert [m.group(0) for m in DOTTED.finditer(text)] == ["dmdiff.model.dmdiff.DMDiff"]
    assert not DOTTED.findall("  dmdiff.py   DMDiffConfig")
    assert [m.group(0) for m in PATH.finditer(text)] == ["dmdiff/model/dmdiff.py", "docs/method.md"]
    assert LINK.findall(text) == ["docs/method.md"]
    assert not any(s in "DESIGN notes, the shared folder" for s in FORBIDDEN)
