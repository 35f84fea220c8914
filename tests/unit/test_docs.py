"""The documentation a newcomer reads first: a README that fits on a screen and a half, links that resolve
(files and GitHub-style heading anchors), the stable commands named, no dated timings outside BENCHMARKS.md, and
a config reference that is exactly what the generator prints."""
import re
from pathlib import Path

import pytest

README_MAX_LINES = 220
# The stable entry points (setup.py's console scripts are read below); launch's verbs and the two setup commands.
COMMANDS = ["make demo", "make test", "python -m data_prep.synthetic", "python -m data_prep ",
            "python -m distributed.train", "python -m distributed.evaluate", "python -m distributed.predict",
            "python -m launch", "python -m benchmarks", "--config", "--set"]
LAUNCH_VERBS = ["prep", "train", "evaluate", "pipeline", "plan", "sweep", "vcluster"]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:.+?)\1")


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", root / "ARCHITECTURE.md", root / "BENCHMARKS.md"] + \
        sorted((root / "docs").glob("*.md"))


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    inside = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (no code ticks, emphasis or link targets), lower case,
    punctuation dropped but hyphens and underscores, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.add(s if k == 0 else f"{s}-{k}")
    return out


def links(path: Path):
    """(line number, target) of every Markdown link outside code."""
    for n, line in prose_lines(path.read_text()):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            yield n, m.group(1)


def test_readme_fits_on_a_screen_and_a_half(root):
    lines = (root / "README.md").read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("name", ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md", "docs/user-guide.md",
                                  "docs/cluster-guide.md", "docs/results-guide.md", "docs/config-reference.md",
                                  "docs/metrics-reference.md"])
def test_documents_exist(root, name):
    assert (root / name).is_file()


def test_relative_links_resolve(root):
    broken = []
    for doc in doc_files(root):
        for n, target in links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(root)}:{n}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif root.resolve() not in dest.parents and dest != root.resolve():
                broken.append(f"{where} (outside the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} (no heading with that anchor)")
    assert broken == [], "\n".join(broken)


def test_readme_names_the_stable_commands(root):
    readme = (root / "README.md").read_text()
    scripts = re.findall(r'"(cxr-[a-z]+)=', (root / "setup.py").read_text())
    assert len(scripts) >= 7
    missing = [c for c in COMMANDS + scripts if c not in readme]
    launch = re.search(r"python -m launch \{([a-z,]+)\}", readme)
    verbs = set(launch.group(1).split(",")) if launch else set()
    verbs |= set(re.findall(r"python -m launch ([a-z]+)", readme))
    missing += [f"python -m launch {v}" for v in LAUNCH_VERBS if v not in verbs]
    assert missing == []


def test_no_dated_measurements_in_readme(root):
    """Measured tables and timings live in BENCHMARKS.md with command, date and CPU; the README links to them."""
    readme = (root / "README.md").read_text()
    assert re.findall(r"\b20\d\d-\d\d-\d\d\b", readme) == []


def test_config_reference_is_what_the_generator_prints(root):
    from data_prep.config import reference_markdown

    assert (root / "docs" / "config-reference.md").read_text() == reference_markdown(), \
        "regenerate: python -m data_prep.config --reference > docs/config-reference.md"


def test_metrics_reference_is_what_the_dataclasses_say(root):
    """docs/metrics-reference.md is generated from distributed/results.py: a key added, renamed or documented
    differently in a record and not in the reference (or the other way round) fails here."""
    import dataclasses

    from distributed import results

    for cls in results.records():
        assert not cls.__doc__.startswith(f"{cls.__name__}("), f"{cls.__name__} has no docstring"
        for f in dataclasses.fields(cls):
            assert f.name == "unknown" or f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
    assert (root / "docs" / "metrics-reference.md").read_text() == results.schema_markdown(), \
        "regenerate: python -m distributed.results > docs/metrics-reference.md"


def test_slug_matches_github():
    assert slug("Run directory (`run.dir`)") == "run-directory-rundir"
    assert slug("Time limits, preemption and kill -9") == "time-limits-preemption-and-kill--9"
    assert slug("calibration.json and operating_point.json") == "calibrationjson-and-operating_pointjson"


# A measured figure in a docstring: a date, a throughput, an AUC, "N x/% faster/slower", "N s idle", "about N MB".
MEASURED = re.compile(r"\b20\d\d-\d\d-\d\d\b|\d\s*(img|images)/s\b|\bAUC\s*(of\s*)?0\.\d\d|"
                      r"\d\s*(x|%|percent)\s+(faster|slower)|\b(faster|slower)\s+in\s+\d|\d\s*s\s+idle\b|"
                      r"\babout\s+\d+\s*[MG]B\b|\d(\.\d+)?x\s+at\b")


def test_no_measurements_in_docstrings(root):
    """Issue 35: no diary in docstrings; measurements live in BENCHMARKS.md (with command, date and CPU)."""
    import ast

    assert MEASURED.search("8-10 s idle at the end") and MEASURED.search("(about 120 MB for VGG16")
    assert MEASURED.search("about 3x faster to write") and MEASURED.search("keeps bfloat16 (5x at VGG16")
    found = []
    for pkg in ("data_prep", "distributed", "launch"):
        for path in sorted((root / pkg).glob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(node) or ""
                    found += [f"{path.relative_to(root)}: {m.group(0)!r}" for m in MEASURED.finditer(doc)]
    assert found == [], "measurements in docstrings (move them to BENCHMARKS.md): " + ", ".join(found)
