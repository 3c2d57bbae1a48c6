"""The debian source (fetch -> text -> corpus), the hf preset, the token check before any job, describe().

No test downloads a package: a .deb is built here with dpkg-deb from documents written here, and apt-get
and apt-cache are stand-ins (scripts on PATH that serve that .deb) wherever the fetch step runs.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BASE_CONFIG, REPO
from workflow_util import snakemake, write_config

from llmpar.config import prepare
from llmpar.data import describe
from llmpar.data import tokenize as tokenize_mod
from llmpar.data.corpus import (
    build_corpus,
    check_source,
    check_tokens,
    lower_bound_tokens,
    split_documents,
    upper_bound_tokens,
)
from llmpar.data.debian import check_packages, drop_boilerplate, extract, fetch
from llmpar.data.describe import describe_study
from llmpar.data.textextract import html_paragraphs, pod_paragraphs, rst_paragraphs
from llmpar.data.tokenize import bpe_tokenizer, build_shards, build_tokenizer
from llmpar.errors import DataError

PROSE = ("The scheduler assigns each runnable task a share of the processor in proportion to its weight, "
         "and it revisits that decision whenever a task wakes up or goes to sleep again.")

GUIDE_HTML = f"""<!DOCTYPE html><html><head><title>Demo guide</title><style>body {{ color: red }}</style>
<script>var hiddenScript = 1;</script></head><body>
<div class="related" role="navigation"><a href="index.html">previous</a> | <a href="next.html">next</a></div>
<div class="body"><h1>Guide to the demo<a class="headerlink" href="#g">¶</a></h1>
<p>{PROSE} Call <code>schedule()</code> to yield.</p>
<pre>SECRET_CODE_LINE = do_not_keep()</pre>
<ul><li>First point of the list, in words.</li><li>Second point &amp; an entity.</li></ul></div>
<div class="footer">Copyright footer of the demo</div></body></html>
"""
TOC_HTML = "<html><body><h1>Contents</h1><ul>" + "".join(
    f'<li><a href="p{i}.html">Chapter number {i} of the manual</a></li>' for i in range(30)) + "</ul></body></html>"
INTRO_RST = f""".. SPDX-License-Identifier: GPL-2.0

=====================
Introduction to demos
=====================

{PROSE}
Allocate with :c:func:`kmalloc` and see :ref:`the memory guide <memory>` for ``GFP_KERNEL``.

.. code-block:: c

   int hidden_code_block;

An example follows::

   literal_hidden_block --flag

   literal_hidden_second_line

.. note::

   Notes are prose and are kept in the text.

.. this comment is hidden
   and so is its second line
"""
DEMO_POD = f"""=head1 NAME

demo - a POD page

=head1 DESCRIPTION

{PROSE} Use B<bold> and C<code> and L<perlfunc/open>.X<hidden_index_entry>

    pod_hidden_verbatim_code();

=cut
"""


def dictd(entries: dict[str, str]) -> tuple[bytes, bytes]:
    """A dictd database (index, dict.dz) of ``entries``, with the database's own info entry first."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(n: int) -> str:
        out = ""
        while True:
            out = digits[n % 64] + out
            n //= 64
            if not n:
                return out

    data, index = b"", []
    for head, body in {"00-database-info": "This file was converted by a tool.", **entries}.items():
        raw = f"{head}\n   {body}\n\n".encode()
        index.append(f"{head}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    return ("\n".join(index) + "\n").encode(), gzip.compress(data)


DICT_INDEX, DICT_DATA = dictd({"kernel": f"The core of an operating system. {PROSE}",
                               "scheduler": f"The part of the kernel that picks a task. {PROSE}"})

DEMO_FILES = {
    "usr/share/doc/demo/html/guide.html": GUIDE_HTML.encode(),
    "usr/share/doc/demo/html/copy/guide.html": GUIDE_HTML.encode(),  # the same page twice: kept once
    "usr/share/doc/demo/html/index.html": TOC_HTML.encode(),  # all links: navigation, no document
    "usr/share/doc/demo/html/short.html": b"<html><body><p>Too short to keep.</p></body></html>",
    "usr/share/doc/demo/rst/intro.rst.gz": gzip.compress(INTRO_RST.encode()),
    "usr/share/doc/demo/pod/demo.pod": DEMO_POD.encode(),
    "usr/share/doc/demo/image.png": b"\x89PNG not text",
}
DICT_FILES = {"usr/share/dictd/demo.index": DICT_INDEX, "usr/share/dictd/demo.dict.dz": DICT_DATA}
DEMO_SPEC = {"name": "demo-doc", "include": ["usr/share/doc/demo/*.html", "usr/share/doc/demo/*.rst.gz",
                                             "usr/share/doc/demo/*.pod"]}
DICT_SPEC = {"name": "dict-demo", "include": ["usr/share/dictd/demo.*"], "format": "dictd"}


def debian_cfg(*packages: dict, **settings) -> dict:
    cfg = prepare({"data": {"source": "debian", "debian": {"packages": list(packages), **settings}},
                   "runs": {"s": {"strategy": "single"}}, "baseline": "s"})
    return cfg["data"]["debian"]


DPKG_DEB = shutil.which("dpkg-deb")  # looked up before any test narrows PATH to the apt stand-ins


def build_deb(out_dir: Path, name: str, files: dict[str, bytes], version: str = "1.0-1") -> Path:
    if not DPKG_DEB:
        pytest.skip("dpkg-deb is not installed (it builds the test package)")
    root = out_dir / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <test@example.org>\n"
        "Description: documents for a test\n")
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    deb = out_dir / f"{name}_{version}_all.deb"
    subprocess.run([DPKG_DEB, "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], check=True,
                   capture_output=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # it runs tar
    shutil.rmtree(root)
    return deb


FAKE_APT = """#!{python}
# A stand-in for apt-cache and apt-get: serves the .deb files listed in registry.json beside it.
import json, shutil, sys, hashlib, os
from pathlib import Path
registry = json.loads((Path(__file__).parent / "registry.json").read_text())
tool, args = Path(sys.argv[0]).name, [a for a in sys.argv[1:] if not a.startswith("-")]
cmd, names = args[0], args[1:]
found = [n for n in names if n.split("=")[0] in registry]
for n in names:
    if n not in found:
        print(f"N: Unable to locate package {{n}}", file=sys.stderr)
if not found:
    print("E: No packages found", file=sys.stderr)
    sys.exit(100)
for n in found:
    entry = registry[n.split("=")[0]]
    if tool == "apt-cache":
        data = Path(entry["deb"]).read_bytes()
        print(f"Package: {{n.split('=')[0]}}\\nVersion: {{entry['version']}}\\nArchitecture: all\\n"
              f"Size: {{len(data)}}\\nSHA256: {{entry.get('sha256') or hashlib.sha256(data).hexdigest()}}\\n")
    else:
        shutil.copy(entry["deb"], Path.cwd() / Path(entry["deb"]).name)
sys.exit(100 if tool == "apt-get" and len(found) < len(names) else 0)
"""


def fake_apt(bin_dir: Path, registry: dict) -> Path:
    """apt-cache and apt-get stand-ins in ``bin_dir`` serving ``registry`` (name -> {deb, version[, sha256]})."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "registry.json").write_text(json.dumps({k: {**v, "deb": str(v["deb"])} for k, v in registry.items()}))
    for tool in ("apt-cache", "apt-get"):
        (bin_dir / tool).write_text(FAKE_APT.format(python=sys.executable))
        (bin_dir / tool).chmod(0o755)
    return bin_dir


@pytest.fixture()
def apt(tmp_path, monkeypatch):
    """A machine whose apt sources have demo-doc and dict-demo (and nothing else): PATH holds only the
    stand-ins, so the real apt-get is out of reach."""
    debs = tmp_path / "pool"
    debs.mkdir()
    registry = {"demo-doc": {"deb": build_deb(debs, "demo-doc", DEMO_FILES), "version": "1.0-1"},
                "dict-demo": {"deb": build_deb(debs, "dict-demo", DICT_FILES, "2.3-4"), "version": "2.3-4"}}
    bin_dir = fake_apt(tmp_path / "bin", registry)
    monkeypatch.setenv("PATH", str(bin_dir))
    return registry


# --------------------------------------------------------------------------- converters


def test_html_keeps_prose_and_drops_scripts_styles_navigation_code_and_footers():
    text = " ".join(html_paragraphs(GUIDE_HTML))
    assert PROSE in text and "Call schedule() to yield." in text
    assert "Guide to the demo" in text and "Second point & an entity." in text
    for hidden in ("hiddenScript", "color: red", "previous", "SECRET_CODE_LINE", "Copyright footer", "¶",
                   "Demo guide"):
        assert hidden not in text, hidden
    assert html_paragraphs(TOC_HTML) == []  # a page of links is navigation as a whole


def test_rst_keeps_prose_and_drops_markup_code_literal_blocks_and_comments():
    paras = rst_paragraphs(INTRO_RST)
    text = " ".join(paras)
    assert paras[0] == "Introduction to demos"
    assert "Allocate with kmalloc and see the memory guide for GFP_KERNEL." in text
    assert "An example follows:" in text and "Notes are prose and are kept in the text." in text
    for hidden in ("SPDX", "=====", "hidden_code_block", "literal_hidden", "hidden comment", "second line",
                   ":c:func:", "``", "code-block"):
        assert hidden not in text, hidden


def test_pod_keeps_headings_and_text_and_drops_verbatim_code():
    text = " ".join(pod_paragraphs(DEMO_POD))
    assert "DESCRIPTION" in text and "Use bold and code and perlfunc." in text
    for hidden in ("pod_hidden_verbatim_code", "hidden_index_entry", "=head1", "B<", "=cut"):
        assert hidden not in text, hidden


def test_boilerplate_recurring_on_many_pages_is_removed():
    pages = [[f"Page {i} says something of its own.", "Copyright 2024 the demo authors."] for i in range(12)]
    kept, removed = drop_boilerplate(pages, share=0.1)
    assert removed == 1 and all(p == [f"Page {i} says something of its own."] for i, p in enumerate(kept))
    few = pages[:5]  # recurring on fewer than 10 pages: not evidence enough, kept
    assert drop_boilerplate(few, share=0.1) == (few, 0)


# --------------------------------------------------------------------------- fetch and extraction


def test_fetch_writes_a_manifest_and_extraction_gives_one_document_per_file(apt, tmp_path):
    cfg = debian_cfg(DEMO_SPEC, DICT_SPEC)
    manifest = fetch(cfg, tmp_path / "debian")
    demo = manifest["packages"][0]
    assert [p["name"] for p in manifest["packages"]] == ["demo-doc", "dict-demo"]
    assert demo["version"] == "1.0-1" and manifest["packages"][1]["version"] == "2.3-4"
    deb = tmp_path / "debian" / demo["file"]
    assert demo["size"] == deb.stat().st_size and demo["sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "debian" / "manifest.json").read_text()) == manifest

    meta = extract(cfg, tmp_path / "debian", tmp_path / "text")
    docs = (tmp_path / "text" / "demo-doc.txt").read_text().splitlines()
    # guide.html (its copy is a duplicate), intro.rst.gz and demo.pod; index.html is navigation, short.html
    # is under min_words, image.png matches no include glob
    assert len(docs) == 3 and all(PROSE in d for d in docs)
    assert meta["packages"][0]["duplicates_dropped"] == 1 and meta["packages"][0]["short_dropped"] == 1
    entries = (tmp_path / "text" / "dict-demo.txt").read_text().splitlines()
    assert len(entries) == 2 and entries[0].startswith("kernel The core of an operating system.")
    assert meta["documents"] == 5 and meta["words"] == sum(len(d.split()) for d in docs + entries)
    assert meta["packages"][1] | {"version": "2.3-4", "name": "dict-demo"} == meta["packages"][1]


def test_a_package_whose_documents_an_earlier_package_holds_is_refused(apt, tmp_path):
    copy_deb = build_deb(tmp_path / "pool", "dict-copy", DICT_FILES)
    fake_apt(tmp_path / "bin", {**apt, "dict-copy": {"deb": copy_deb, "version": "1.0-1"}})
    cfg = debian_cfg(DICT_SPEC, DICT_SPEC | {"name": "dict-copy"})
    fetch(cfg, tmp_path / "debian")
    with pytest.raises(DataError, match="package 'dict-copy': every document duplicates one of an earlier"):
        extract(cfg, tmp_path / "debian", tmp_path / "text")
    assert not (tmp_path / "text").exists()


@pytest.mark.parametrize("spec, message", [
    (DEMO_SPEC | {"include": ["usr/share/doc/nothing/*.html"]}, "package 'demo-doc': no file matches"),
    (DEMO_SPEC | {"include": ["usr/share/doc/demo/html/index.html"]}, "package 'demo-doc': .*empty extraction"),
    (DEMO_SPEC | {"include": ["usr/share/doc/demo/image.png"]}, "package 'demo-doc': no converter for"),
])
def test_an_extraction_that_yields_nothing_names_the_package(apt, tmp_path, spec, message):
    cfg = debian_cfg(spec)
    fetch(cfg, tmp_path / "debian")
    with pytest.raises(DataError, match=message):
        extract(cfg, tmp_path / "debian", tmp_path / "text")
    assert not (tmp_path / "text").exists()


def test_a_deb_that_differs_from_its_manifest_is_refused(apt, tmp_path):
    cfg = debian_cfg(DEMO_SPEC)
    manifest = fetch(cfg, tmp_path / "debian")
    deb = tmp_path / "debian" / manifest["packages"][0]["file"]
    deb.write_bytes(deb.read_bytes() + b"\0")
    with pytest.raises(DataError, match="package 'demo-doc': .* differs from the manifest's sha256"):
        extract(cfg, tmp_path / "debian", tmp_path / "text")


def test_a_package_the_apt_sources_lack_is_refused_naming_it_before_any_download(apt, tmp_path):
    cfg = debian_cfg(DEMO_SPEC, {"name": "no-such-doc", "include": ["*"]})
    with pytest.raises(DataError, match="have no package 'no-such-doc'"):
        check_packages(cfg)
    with pytest.raises(DataError, match="have no package 'no-such-doc'"):
        fetch(cfg, tmp_path / "debian")
    assert not list((tmp_path / "debian").glob("*.deb")) and not (tmp_path / "debian" / "manifest.json").exists()
    with pytest.raises(DataError, match="package 'demo-doc' is listed twice"):
        check_packages(debian_cfg(DEMO_SPEC, DEMO_SPEC))
    pinned = debian_cfg(DEMO_SPEC | {"version": "9.9-9"})  # a version the sources do not serve
    with pytest.raises(DataError, match="have no package 'demo-doc=9.9-9'"):
        check_packages(pinned)


def test_a_download_whose_checksum_differs_from_the_apt_sources_is_refused(apt, tmp_path):
    fake_apt(tmp_path / "bin", {**apt, "demo-doc": {**apt["demo-doc"], "sha256": "0" * 64}})
    with pytest.raises(DataError, match="package 'demo-doc': the downloaded file's sha256"):
        fetch(debian_cfg(DEMO_SPEC), tmp_path / "debian")
    assert not (tmp_path / "debian" / "manifest.json").exists()


def test_without_apt_get_the_source_is_refused_unless_its_download_is_there(apt, tmp_path, monkeypatch):
    cfg = debian_cfg(DEMO_SPEC)
    fetch(cfg, tmp_path / "debian")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="'apt-cache' is not on this machine|'apt-get' is not on this machine"):
        check_packages(cfg)
    check_packages(cfg, tmp_path / "debian")  # the manifest of exactly these packages: nothing to fetch
    with pytest.raises(DataError, match="'apt-get' is not on this machine"):
        check_packages(debian_cfg(DEMO_SPEC, DICT_SPEC), tmp_path / "debian")  # one more package to fetch


def test_debian_corpus_records_its_packages_and_describe_names_them(apt, tmp_path):
    cfg = debian_cfg(DEMO_SPEC, DICT_SPEC)
    fetch(cfg, tmp_path / "debian")
    extract(cfg, tmp_path / "debian", tmp_path / "text")
    data = {"source": "debian", "debian": cfg, "val_fraction": 0.2}
    meta = build_corpus(data, 1, tmp_path / "corpus", tmp_path / "text")
    assert meta["synthetic"] is False and meta["documents"] == {"train": 4, "val": 1}
    assert meta["description"]["packages"] == [{"name": "demo-doc", "version": "1.0-1"},
                                               {"name": "dict-demo", "version": "2.3-4"}]
    build_tokenizer({"kind": "bpe", "vocab_size": 300}, tmp_path / "corpus" / "train.txt", tmp_path / "tok.json")
    tokens = build_shards(tmp_path / "tok.json", tmp_path / "corpus", tmp_path / "tokens")
    d = describe(meta, tokens)
    assert d["kind"] == "debian" and d["synthetic"] is False and d["tokens"] == tokens["tokens"]
    assert d["line"].startswith("real text: 2 Debian documentation packages (demo-doc 1.0-1, dict-demo 2.3-4)")
    assert f"{tokens['tokens']['train']:,} train / {tokens['tokens']['val']:,} val tokens (BPE " in d["line"]
    assert d["line"].endswith("not synthetic")


def test_describe_takes_what_the_records_lack_from_the_config_and_never_guesses():
    """A corpus record without its source's description and token shards whose meta names no tokenizer model
    are described from the study's data and tokenizer config; without a config, describe names the missing field."""
    meta = {"source": "synthetic", "documents": {"train": 9, "val": 1}, "characters": {"train": 90, "val": 10}}
    tokens = {"tokens": {"train": 4_272_800, "val": 87_200}, "vocab_size": 660}
    data = {"source": "synthetic", "synthetic": {"documents": 10, "words_per_document": 200}}
    syn = describe(meta, tokens, data, {"kind": "bpe", "vocab_size": 8192, "pretrained": None})
    assert syn["line"] == ("synthetic: Markov chain over 200 made-up words, 200 words a document, 10 documents, "
                           "100 bytes, 4.3 M train / 87,200 val tokens (BPE 660), synthetic")
    assert "?" not in describe_study(data, {"kind": "bpe"}, None, tokens)
    with pytest.raises(ValueError, match="no description"):
        describe(meta)
    with pytest.raises(ValueError, match="tokenizer_model"):
        describe(meta, tokens, data)


# --------------------------------------------------------------------------- token check before any job

TEN_LINES = [f"Line {i}: the quick brown fox jumps over the lazy dog near the riverbank today." for i in range(10)]


def _text_cfg(tmp_path, lines, **data):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return prepare({"data": {"source": "text", "files": [str(path)], **data}, "runs": {"s": {"strategy": "single"}},
                    "baseline": "s"})


def test_the_token_bounds_hold_for_a_trained_bpe():
    docs = [PROSE, INTRO_RST.replace("\n", " "), GUIDE_HTML.replace("\n", " "), "naïve café – 12½ ½ x² e\u0301"]
    tok = bpe_tokenizer(docs, 400)
    exact = sum(len(e.ids) + 1 for e in tok.encode_batch(docs))
    assert lower_bound_tokens(docs) <= exact <= upper_bound_tokens(docs)
    assert lower_bound_tokens(docs) > 0.5 * exact  # a bound that means something, not zero


def test_ten_short_lines_are_refused_by_exact_count_without_writing_anything(tmp_path):
    """Each line is longer than a sequence in bytes (79 > 65), so the byte bound alone passes it: the
    check counts the validation line exactly with a BPE trained in memory and refuses it."""
    cfg = _text_cfg(tmp_path, TEN_LINES)
    with pytest.raises(DataError, match=r"its validation split holds 19 tokens \(1 of 10 documents, with the "
                                        r"study's BPE of 512 .*model.seq_len \+ 1 = 65 tokens"):
        check_source(cfg["data"], 64, cfg["seed"], cfg["tokenizer"], tmp_path / "results")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]
    # what the tokenize step would count: the same 19
    train, val = split_documents(TEN_LINES, cfg["data"]["val_fraction"], cfg["seed"])
    assert sum(len(e.ids) + 1 for e in bpe_tokenizer(train, 512).encode_batch(val)) == 19


def test_a_split_shorter_in_bytes_than_a_sequence_is_refused_by_the_byte_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_mod, "bpe_tokenizer", None)  # decided without a tokenizer
    cfg = _text_cfg(tmp_path, ["hello world", "small corpus"], val_fraction=0.4)
    with pytest.raises(DataError, match=r"its training split holds at most 13 tokens \(the bytes of its 1 of 2"):
        check_tokens(*split_documents(["hello world", "small corpus"], 0.4, 1), 64, cfg["tokenizer"], "data.files")


def test_a_corpus_with_enough_pre_tokens_passes_without_a_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_mod, "bpe_tokenizer", None)  # the lower bound decides: no BPE is trained
    cfg = _text_cfg(tmp_path, TEN_LINES * 10)
    check_source(cfg["data"], 64, cfg["seed"], cfg["tokenizer"])


def test_the_tokenize_step_refuses_a_short_split_with_a_message_and_no_shards(tmp_path):
    cfg = _text_cfg(tmp_path, TEN_LINES)
    build_corpus(cfg["data"], cfg["seed"], tmp_path / "corpus")
    build_tokenizer(cfg["tokenizer"], tmp_path / "corpus" / "train.txt", tmp_path / "tok.json")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), "tokenize", "--tokenizer-json",
                           str(tmp_path / "tok.json"), "--corpus-dir", str(tmp_path / "corpus"), "--out",
                           str(tmp_path / "tokens"), "--min-tokens", "65"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: corpus too short: its validation split holds 19 tokens with tok.json, fewer than one " \
           "sequence of model.seq_len + 1 = 65 tokens" in proc.stderr
    assert not (tmp_path / "tokens").exists()


def test_built_shards_too_short_for_a_longer_seq_len_are_refused_at_workflow_start(tmp_path):
    cfg = _text_cfg(tmp_path, TEN_LINES * 20)
    data = tmp_path / "results" / "data"
    build_corpus(cfg["data"], cfg["seed"], data / "corpus")
    build_tokenizer(cfg["tokenizer"], data / "corpus" / "train.txt", data / "tok.json")
    tokens = build_shards(data / "tok.json", data / "corpus", data / "tokens")
    synthetic = {"source": "synthetic", "synthetic": {"documents": 10, "words_per_document": 8}}
    check_source(synthetic, tokens["tokens"]["val"] - 1, 0, cfg["tokenizer"], data)
    with pytest.raises(DataError, match=f"its validation split holds {tokens['tokens']['val']} tokens"):
        check_source(synthetic, tokens["tokens"]["val"], 0, cfg["tokenizer"], data)


def _workflow(tmp_path, data):
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["data"] = data
    cfg["model"]["seq_len"] = 64
    cfg["tokenizer"]["vocab_size"] = 512
    write_config(tmp_path, cfg)
    start = time.monotonic()
    proc = snakemake(tmp_path, check=False, timeout=300)
    return proc, proc.stdout + proc.stderr, time.monotonic() - start


def test_workflow_refuses_ten_short_lines_in_seconds_with_nothing_under_results(tmp_path):
    (tmp_path / "ten.txt").write_text("\n".join(TEN_LINES) + "\n")
    proc, out, seconds = _workflow(tmp_path, {"source": "text", "files": [str(tmp_path / "ten.txt")]})
    assert proc.returncode != 0 and "corpus too short: its validation split holds 19 tokens" in out, out[-2000:]
    assert seconds < 60 and not (tmp_path / "results").exists()


def test_workflow_refuses_a_debian_package_the_apt_sources_lack_before_any_job(apt, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + ":" + str(Path(sys.executable).parent) + ":/usr/bin:/bin")
    packages = [DEMO_SPEC, {"name": "no-such-doc", "include": ["*"]}]
    proc, out, _ = _workflow(tmp_path, {"source": "debian", "debian": {"packages": packages}})
    assert proc.returncode != 0 and "have no package 'no-such-doc'" in out, out[-2000:]
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- presets


def test_realtext_preset_takes_the_schema_default_packages():
    raw = yaml.safe_load((REPO / "configs" / "data" / "realtext.yaml").read_text())
    assert raw["data"] == {"source": "debian", "val_fraction": 0.02}  # the package list lives in the schema
    cfg = prepare(raw)
    names = [p["name"] for p in cfg["data"]["debian"]["packages"]]
    assert names[0] == "linux-doc-6.1" and len(names) == len(set(names)) >= 30
    assert cfg["tokenizer"] == {"kind": "bpe", "vocab_size": 32000, "pretrained": None}


def test_wikitext_preset_loads_through_datasets_from_local_files(tmp_path):
    """The hf preset names the hub dataset; offline, the same loading code reads local files through the
    packaged "text" builder (one document per non-empty line, as wikitext's rows)."""
    raw = yaml.safe_load((REPO / "configs" / "data" / "wikitext103.yaml").read_text())
    assert raw["data"]["hf"]["name"] == "Salesforce/wikitext"
    assert raw["data"]["hf"]["config"] == "wikitext-103-raw-v1"
    lines = [" = Valkyria Chronicles III = ", "", f" {PROSE} ", " = = Gameplay = = ", f" {PROSE} It is fun. "]
    (tmp_path / "wiki.train.raw").write_text("\n".join(lines * 20) + "\n")
    raw["data"]["hf"].update(name="text", config=None, data_files=[str(tmp_path / "wiki.train.raw")])
    cfg = prepare(raw)
    check_source(cfg["data"])
    meta = build_corpus(cfg["data"], cfg["seed"], tmp_path / "corpus")
    assert sum(meta["documents"].values()) == 80  # the blank rows are not documents
    assert describe(meta)["line"].startswith("Hugging Face dataset text (split train) from local files")
