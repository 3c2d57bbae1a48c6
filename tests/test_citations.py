"""Every path of the repository that its documents, configs and code cite exists: a tracked file or folder, a
glob or brace list that matches tracked files, or an output the workflow writes (a path git ignores). A renamed
record or a mistyped config name in a comment or a results page is caught here, not by a reader."""

from __future__ import annotations

import fnmatch
import itertools
import re
import subprocess

from conftest import REPO

# Measurement records and logs may hold paths of the machine that wrote them; the tests' paths are temporary.
NOT_CITING = re.compile(r"^(tests/|results/|benchmarks/results/(?!README\.md$))")
TEXT = re.compile(r"(\.(md|ya?ml|py|sh|smk|rst|toml|txt|cfg)|/Makefile|/Snakefile|^Makefile|^Snakefile)$")
PATH_CHARS = r"(?:[\w.+*-]|\{[\w.,-]*\})"
# what a document tells its reader to create (``cp configs/gpu2-1b.yaml configs/a100x2-1b.yaml``)
COPY_TARGET = re.compile(r"\bcp\s+(?:-\w+\s+)*\S+\s+(\S+?)[`\s)]")


def git(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], input=stdin, capture_output=True, text=True,
                          check=False)


def tracked() -> list[str]:
    out = git("ls-files")
    assert out.returncode == 0, f"the citation check reads git's file list: {out.stderr}"
    return out.stdout.split()


def expand(path: str) -> list[str] | None:
    """The paths a brace list stands for (``x{2,4}`` -> x2, x4); None where a brace holds one name, a placeholder
    of code (``results/{study}``)."""
    groups = re.findall(r"\{([^}]*)\}", path)
    if any("," not in g for g in groups):
        return None
    parts = re.split(r"\{[^}]*\}", path)
    return ["".join(itertools.chain.from_iterable(zip(parts, (*choice, "")))) for choice in
            itertools.product(*(g.split(",") for g in groups))]


def citations(files: list[str]) -> dict[str, set[str]]:
    """Each cited repository path and the files that cite it."""
    tops = sorted({f.split("/")[0] for f in files if "/" in f})
    pattern = re.compile(rf"(?<![\w/.{{-])((?:{'|'.join(map(re.escape, tops))})/(?:{PATH_CHARS}|/)+)")
    cited: dict[str, set[str]] = {}
    for f in files:
        if NOT_CITING.match(f) or not TEXT.search(f):
            continue
        text = (REPO / f).read_text(errors="replace")
        created = set(COPY_TARGET.findall(text))
        for match in pattern.finditer(text):
            path = match.group(1).rstrip(".")
            if path not in created:
                cited.setdefault(path, set()).add(f)
    return cited


def missing(cited: dict[str, set[str]], files: list[str]) -> list[str]:
    known = set(files) | {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
    unknown: dict[str, str] = {}
    for path in cited:
        for p in expand(path) or []:
            p = p.rstrip("/")
            if any(c in p for c in "*?[") and not fnmatch.filter(files, p):
                unknown[p] = path
            elif not any(c in p for c in "*?[") and p not in known:
                unknown[p] = path
    # git matches a folder pattern (``/report/*/``) only against a path that ends in a slash
    asked = [q for p in unknown for q in (p, p + "/")]
    ignored = {q.rstrip("/") for q in git("check-ignore", "--stdin", stdin="\n".join(asked)).stdout.split()}
    return sorted(f"{p} (cited by {', '.join(sorted(cited[unknown[p]]))})" for p in unknown if p not in ignored)


def test_every_cited_path_exists():
    files = tracked()
    cited = citations(files)
    assert len(cited) > 100, "the scan found almost no citations: its pattern no longer matches the repository's"
    assert not missing(cited, files)


def test_a_renamed_record_is_caught(tmp_path):
    files = tracked()
    cited = citations(files)
    record = "results/h200-1b/probe/profile.jsonl"
    assert record in cited  # cards.yaml cites it
    gone = missing(cited, [f for f in files if f != record])
    assert any(g.startswith(record) for g in gone)


def test_brace_lists_globs_and_placeholders():
    assert expand("results/h100x{2,4}-1b/runs") == ["results/h100x2-1b/runs", "results/h100x4-1b/runs"]
    assert expand("results/{study}/runs") is None
    files = ["benchmarks/results/a_h100.txt", "configs/x.yaml"]
    cited = {"benchmarks/results/*_h100.txt": {"R.md"}, "configs/{x,y}.yaml": {"R.md"}}
    assert missing(cited, files) == ["configs/y.yaml (cited by R.md)"]
