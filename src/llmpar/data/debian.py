"""A real-text corpus from Debian documentation packages, obtained with apt alone (no URL, no hub).

Three steps, each a workflow rule:

1. ``fetch``: ``apt-get download`` of the configured packages into the study's data folder; a manifest
   records each package's name, version, architecture, size and sha256 (the versions are whatever the
   machine's apt sources serve: they cannot be pinned beyond ``name=version``, so they are recorded).
2. ``extract``: from each ``.deb`` (read in Python: its ar archive and the ``data.tar`` member, so no
   ``dpkg`` is needed), the files that match the package's ``include`` globs (less its ``exclude``
   globs) become documents: HTML, reStructuredText, POD and plain text converted to paragraphs
   (``textextract``), a dictd dictionary split into its entries. One document per source file (a page,
   a chapter, a manual page), its paragraphs joined by single spaces since the corpus format holds one
   document per line; one per entry for a dictionary. Paragraphs that recur on many pages of a package
   (headers, footers, navigation: ``drop_boilerplate``) are removed, documents under ``min_words`` words
   dropped, identical documents kept once. The result is one text file per package (one document a line) plus
   ``meta.json``.
3. The ``corpus`` step then reads those files like the ``text`` source and splits them by document, so
   no page is half in the training and half in the validation split.

Every failure names the package: no apt-get on this machine, a package the apt sources do not have, a
download whose checksum does not match the manifest, a package from which the globs extract nothing.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import lzma
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from llmpar.data import textextract
from llmpar.errors import DataError
from llmpar.io import write_json, write_text

MANIFEST = "manifest.json"
# a paragraph is boilerplate only if it recurs in at least this many pages of a package (see drop_boilerplate)
BOILERPLATE_MIN_PAGES = 10


# --------------------------------------------------------------------------- package specs


def package_specs(debian_cfg: dict) -> list[dict]:
    """The configured packages, each ``{name, version, include, exclude, format}``; names unique."""
    specs, seen = [], set()
    for entry in debian_cfg["packages"]:
        name = entry["name"]
        if name in seen:
            raise DataError(f"data.debian.packages: package '{name}' is listed twice")
        seen.add(name)
        specs.append({"name": name, "version": entry.get("version"), "include": list(entry.get("include", [])),
                      "exclude": list(entry.get("exclude", [])), "format": entry.get("format", "auto")})
    if not specs:
        raise DataError("data.debian.packages: no package listed")
    return specs


def _apt_request(spec: dict) -> str:
    return f"{spec['name']}={spec['version']}" if spec.get("version") else spec["name"]


# --------------------------------------------------------------------------- apt


def _require_tool(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise DataError(
            f"data.source debian: '{tool}' is not on this machine ({why}). Run the fetch step on a Debian 12 "
            "machine and copy its data/debian folder (the .deb files and manifest.json) into this study's "
            "results folder, or use data.source text or hf"
        )
    return path


def apt_records(specs: list[dict]) -> dict[str, dict]:
    """``apt-cache show`` of every package at once: name -> {Version, Size, SHA256, Architecture, ...} of the
    version ``apt-get download`` would fetch. A package the apt sources lack is a DataError naming it."""
    apt_cache = _require_tool("apt-cache", "it looks up the packages of data.debian.packages")
    requests = [_apt_request(s) for s in specs]
    proc = subprocess.run([apt_cache, "show", "--no-all-versions", *requests], capture_output=True, text=True)
    records: dict[str, dict] = {}
    for block in proc.stdout.split("\n\n"):
        fields = dict(
            (k, v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines())
            if k and not k.startswith(" ")
        )
        if "Package" in fields:
            records.setdefault(fields["Package"], fields)
    missing = [
        r for s, r in zip(specs, requests)
        if s["name"] not in records or (s.get("version") and records[s["name"]].get("Version") != s["version"])
    ]
    if missing:
        detail = " ".join(proc.stderr.split())[:300]
        raise DataError(
            f"data.debian.packages: the apt sources of this machine have no package {', '.join(map(repr, missing))} "
            f"(apt-cache show{': ' + detail if detail else ' found nothing'}). Run 'apt-get update', or correct "
            "the name or version (Debian 12 'bookworm' names)"
        )
    return records


def check_packages(debian_cfg: dict, fetch_dir: str | Path | None = None) -> None:
    """Cheap up-front check of the debian source: the package list is valid and, unless ``fetch_dir`` already
    holds a manifest of exactly these packages, apt-get is here and its sources have every package."""
    specs = package_specs(debian_cfg)
    if fetch_dir is not None and (Path(fetch_dir) / MANIFEST).is_file():
        manifest = json.loads((Path(fetch_dir) / MANIFEST).read_text())
        if _manifest_matches(manifest, specs):
            return
    _require_tool("apt-get", "it downloads the packages of data.debian.packages")
    apt_records(specs)


def _manifest_matches(manifest: dict, specs: list[dict]) -> bool:
    have = {p["name"]: p for p in manifest.get("packages", [])}
    return set(have) == {s["name"] for s in specs} and all(
        not s.get("version") or have[s["name"]]["version"] == s["version"] for s in specs
    )


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(debian_cfg: dict, out_dir: str | Path) -> dict:
    """``apt-get download`` every package into ``out_dir``, verify each file against apt's SHA256, and write
    ``out_dir/manifest.json``. The .deb files land in a temporary folder first and move into place only when
    all of them are complete, so an interrupted fetch leaves no manifest."""
    specs = package_specs(debian_cfg)
    apt_get = _require_tool("apt-get", "it downloads the packages of data.debian.packages")
    records = apt_records(specs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    packages, files = [], []
    with tempfile.TemporaryDirectory(prefix=".fetch.", dir=out_dir) as tmp:
        proc = subprocess.run([apt_get, "download", *[_apt_request(s) for s in specs]], cwd=tmp,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(f"apt-get download failed (exit {proc.returncode}): {' '.join(proc.stderr.split())[:500]}")
        debs = sorted(Path(tmp).glob("*.deb"))
        for spec in specs:
            rec = records[spec["name"]]
            found = [p for p in debs if p.name.split("_", 1)[0] == spec["name"]]
            if len(found) != 1:
                raise DataError(f"package '{spec['name']}': apt-get download left {len(found)} files for it "
                                "(expected one .deb)")
            digest = sha256_file(found[0])
            if rec.get("SHA256") and digest != rec["SHA256"]:
                raise DataError(f"package '{spec['name']}': the downloaded file's sha256 {digest} differs from "
                                f"the apt sources' {rec['SHA256']}")
            files.append(found[0])
            packages.append({"name": spec["name"], "version": rec["Version"],
                             "architecture": rec.get("Architecture"), "file": f"{spec['name']}.deb",
                             "size": found[0].stat().st_size, "sha256": digest})
        for path, pkg in zip(files, packages):
            path.replace(out_dir / pkg["file"])
    manifest = {"packages": packages, "bytes": sum(p["size"] for p in packages)}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(fetch_dir: str | Path) -> dict:
    path = Path(fetch_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found (run the fetch step first)")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- .deb reading


def deb_data_members(deb: str | Path):
    """(path, bytes) of every regular file in a .deb's data archive, read without dpkg: a .deb is an ar
    archive whose ``data.tar.{xz,gz,bz2}`` member holds the files."""
    raw = Path(deb).read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise DataError(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            raise DataError(f"{deb}: data member {name} is zstd-compressed, which Python's tarfile cannot read")
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name.removeprefix("./"), tar.extractfile(member).read()
        return
    raise DataError(f"{deb} has no data.tar member")


def _matches(path: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def drop_boilerplate(pages: list[list[str]], share: float) -> tuple[list[list[str]], int]:
    """Remove the paragraphs that recur in at least ``share`` of a package's pages (and in at least
    BOILERPLATE_MIN_PAGES of them): headers, footers, navigation and sidebars that no class name marked.
    Returns the pages and the number of distinct paragraphs removed."""
    counts: dict[str, int] = {}
    for paras in pages:
        for p in set(paras):
            counts[p] = counts.get(p, 0) + 1
    limit = max(BOILERPLATE_MIN_PAGES, share * len(pages))
    frequent = {p for p, c in counts.items() if c >= limit}
    return [[p for p in paras if p not in frequent] for paras in pages], len(frequent)


def package_documents(deb: str | Path, spec: dict, settings: dict) -> tuple[list[str], dict]:
    """The documents of one package and what was read (files matched, documents, words, what was dropped).

    ``settings``: ``min_words`` (shorter documents are dropped), ``boilerplate_share`` and ``exclude``
    (globs left out of every package)."""
    exclude = spec["exclude"] + list(settings.get("exclude", []))
    files = {}
    for path, raw in deb_data_members(deb):
        if _matches(path, spec["include"]) and not _matches(path, exclude):
            files[path] = raw
    if not files:
        raise DataError(f"package '{spec['name']}': no file matches data.debian.packages include "
                        f"{spec['include']} (less exclude {exclude})")
    stats = {"files": len(files), "boilerplate_paragraphs": 0, "short_dropped": 0}
    if spec["format"] == "dictd":
        docs = []
        for index_path in sorted(p for p in files if p.endswith(".index")):
            data_path = index_path[: -len(".index")] + ".dict.dz"
            if data_path not in files:
                raise DataError(f"package '{spec['name']}': dictd index {index_path} has no {data_path}")
            docs.extend(textextract.dictd_entries(files[index_path].decode("utf-8", errors="replace"),
                                                  gzip.decompress(files[data_path])))
    else:
        pages = []
        for path in sorted(files):
            kind = spec["format"] if spec["format"] != "auto" else textextract.converter_for(path)
            if kind is None:
                raise DataError(f"package '{spec['name']}': no converter for {path} (set the package's format, "
                                "or exclude the file)")
            try:
                text = textextract.decode(path, files[path])
            except (OSError, EOFError, lzma.LZMAError) as exc:
                raise DataError(f"package '{spec['name']}': cannot decompress {path}: {exc}") from exc
            pages.append(textextract.CONVERTERS[kind](text))
        pages, stats["boilerplate_paragraphs"] = drop_boilerplate(pages, settings["boilerplate_share"])
        docs = [" ".join(paras) for paras in pages]
    kept = [d for d in docs if len(d.split()) >= settings["min_words"]]
    stats["short_dropped"] = sum(1 for d in docs if d) - len(kept)
    if not kept:
        raise DataError(f"package '{spec['name']}': the {len(files)} matched file(s) hold no document of at least "
                        f"{settings['min_words']} words (empty extraction)")
    return kept, stats


def extract(debian_cfg: dict, fetch_dir: str | Path, out_dir: str | Path) -> dict:
    """One text file per package (``<name>.txt``, one document a line) and ``meta.json`` in ``out_dir``.

    Each .deb is verified against the manifest's sha256 first. A document identical to an earlier one (in
    this or an earlier package, in the configured order) is kept once.
    """
    specs = package_specs(debian_cfg)
    manifest = read_manifest(fetch_dir)
    by_name = {p["name"]: p for p in manifest["packages"]}
    missing = [s["name"] for s in specs if s["name"] not in by_name]
    if missing:
        raise DataError(f"the fetch manifest has no package {missing} (rerun the fetch step)")
    for spec in specs:  # verify every file before the (slow) extraction
        pkg = by_name[spec["name"]]
        path = Path(fetch_dir) / pkg["file"]
        if not path.is_file() or sha256_file(path) != pkg["sha256"]:
            raise DataError(f"package '{spec['name']}': {path} is missing or differs from the manifest's sha256")
    seen: set[bytes] = set()
    out_dir = Path(out_dir)
    results, texts = [], {}
    for spec in specs:
        pkg = by_name[spec["name"]]
        docs, stats = package_documents(Path(fetch_dir) / pkg["file"], spec, debian_cfg)
        unique = []
        for doc in docs:
            key = hashlib.sha256(doc.encode()).digest()
            if key not in seen:
                seen.add(key)
                unique.append(doc)
        stats["duplicates_dropped"] = len(docs) - len(unique)
        if not unique:
            raise DataError(f"package '{spec['name']}': every document duplicates one of an earlier package")
        text = "\n".join(unique) + "\n"
        stats.update(documents=len(unique), words=sum(len(d.split()) for d in unique), bytes=len(text.encode()))
        texts[spec["name"]] = text
        results.append({"name": spec["name"], "version": pkg["version"], "deb_size": pkg["size"],
                        "deb_sha256": pkg["sha256"], **stats})
    for name, text in texts.items():
        write_text(out_dir / f"{name}.txt", text)
    meta = {
        "packages": results,
        "documents": sum(r["documents"] for r in results),
        "words": sum(r["words"] for r in results),
        "bytes": sum(r["bytes"] for r in results),
        "settings": {key: debian_cfg[key] for key in ("min_words", "boilerplate_share", "exclude")},
    }
    write_json(out_dir / "meta.json", meta)
    return meta


def text_files(text_dir: str | Path) -> list[str]:
    """The per-package text files of an extraction, in the order its meta.json lists the packages."""
    meta = json.loads((Path(text_dir) / "meta.json").read_text())
    return [str(Path(text_dir) / f"{p['name']}.txt") for p in meta["packages"]]

