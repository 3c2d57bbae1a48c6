"""Plain text from documentation formats: HTML, reStructuredText, POD, dictd dictionaries, plain text.

Each converter takes one file's decoded text and returns its paragraphs (whitespace collapsed, markup
and code removed where that is cheap). Which converter applies follows from the file name
(``converter_for``); a ``.gz`` suffix is decompressed first.
"""

from __future__ import annotations

import gzip
import re
from html.parser import HTMLParser

# --------------------------------------------------------------------------- HTML

# Elements whose whole content is skipped: not text (scripts, styles), page furniture, and code.
SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "math", "form", "button", "select",
             "textarea", "template", "iframe", "object", "pre", "aside"}
# class or id tokens of navigation, sidebars, headers and footers in the generators these packages use
# (Sphinx, DocBook, Publican, asciidoc, texinfo, mdBook, rustdoc)
SKIP_MARKS = {"related", "sphinxsidebar", "sphinxsidebarwrapper", "footer", "navheader", "navfooter", "docnav",
              "mobile-nav", "menu-wrapper", "headerlink", "breadcrumbs", "breadcrumb", "toc", "banner",
              "inline-search", "version_switcher_placeholder", "language_switcher_placeholder", "navigation",
              "header-navigation", "nav-chapters", "nav-wrapper", "sidebar-scrollbox", "menu-bar", "footnotes",
              "copyright", "searchbox", "highlight", "highlight-default", "programlisting", "screen",
              "synopsis", "literallayout", "example-contents", "sidebar-drawer", "sidebar-tree", "sidebar-sticky",
              "toc-drawer", "toc-tree", "theme-toggle-container", "visually-hidden", "bd-sidebar", "bd-toc",
              "bd-navbar", "prev-next-area", "prev-next-info", "footer-item", "tocsection", "header", "nav-panel",
              "copiable-link", "copiable-anchor", "toplang", "bottomlang", "docs-bottom-navigation", "debug",
              "DEBUG"}
SKIP_ROLES = {"navigation", "search", "banner", "contentinfo"}
# elements that end a paragraph
BLOCK_TAGS = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
              "section", "article", "blockquote", "br", "hr", "caption", "figure", "figcaption", "main", "body",
              "td", "th", "title"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
             "track", "wbr"}


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.link_depth = 0
        self.link_chars = 0
        self.chars = 0

    def _skipped(self, tag: str, attrs) -> bool:
        if tag in SKIP_TAGS:
            return True
        a = dict(attrs)
        marks = set((a.get("class") or "").split()) | {a.get("id") or ""}
        return bool(marks & SKIP_MARKS) or (a.get("role") or "") in SKIP_ROLES

    def _end_paragraph(self):
        text = " ".join("".join(self.current).split())
        if text:
            self.paragraphs.append(text)
        self.current = []

    def handle_starttag(self, tag, attrs):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        if tag not in VOID_TAGS and self._skipped(tag, attrs):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag in BLOCK_TAGS:
            self._end_paragraph()
        elif tag == "a":
            self.link_depth += 1

    def handle_startendtag(self, tag, attrs):
        if self.skip_tag is None and tag in BLOCK_TAGS:
            self._end_paragraph()

    def handle_endtag(self, tag):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self._end_paragraph()
        elif tag == "a" and self.link_depth:
            self.link_depth -= 1

    def handle_data(self, data):
        if self.skip_tag is None:
            self.current.append(data)
            n = len(data.strip())
            self.chars += n
            if self.link_depth:
                self.link_chars += n


def html_paragraphs(text: str, max_link_share: float = 0.5) -> list[str]:
    """The paragraphs of an HTML page's text, without scripts, styles, navigation and code blocks.

    A page most of whose text is link text (a table of contents, an index) is navigation as a whole:
    it gives no paragraphs.
    """
    p = _HTMLText()
    p.feed(text)
    p.close()
    p._end_paragraph()
    if p.chars == 0 or p.link_chars > max_link_share * p.chars:
        return []
    return p.paragraphs


# --------------------------------------------------------------------------- reStructuredText

_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^\s*[+|]?[-=+|: ]*[-=]{3,}[-=+|: ]*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")
_FIELD = re.compile(r"^\s*:[\w -]+:(\s|$)")
# directives whose body is code, tables of files, or other non-prose
_CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "literalinclude", "toctree", "raw", "math", "graphviz",
                    "kernel-doc", "kernel-abi", "kernel-feat", "kernel-figure", "kernel-render", "kernel-include",
                    "maintainers-include", "include", "parsed-literal", "image", "figure", "highlight",
                    "csv-table", "flat-table", "list-table", "tabularcolumns", "only", "productionlist",
                    "doctest", "testcode", "testoutput", "testsetup", "testcleanup", "index", "cssclass",
                    "c:namespace", "c:namespace-push", "c:namespace-pop", "sectionauthor", "moduleauthor",
                    "codeauthor", "auto-generated"}
_ROLE = re.compile(r":[\w:+.-]+:`([^`]*)`")
_LITERAL = re.compile(r"``([^`]+)``")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>`]*>`__?")
_REF = re.compile(r"`([^`]+)`_{0,2}")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")
_EMPH = re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])")
_TARGET = re.compile(r"(?<=\w)__?(?=[\s.,;:)]|$)")


def _rst_inline(line: str) -> str:
    def title(m):  # ":ref:`text <target>`" -> "text"; ":c:func:`foo`" -> "foo"
        inner = m.group(1)
        return inner.split("<", 1)[0].strip() if "<" in inner and inner.endswith(">") else inner.lstrip("~!")

    line = _ROLE.sub(title, line)
    line = _LITERAL.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _REF.sub(r"\1", line)
    line = _STRONG.sub(r"\1", line)
    line = _EMPH.sub(r"\1", line)
    return _TARGET.sub("", line)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_paragraphs(text: str) -> list[str]:
    """The prose of a reStructuredText (or plain-text) document.

    Dropped: section adornments and table rules, comments and link targets, the directive lines (their
    bodies too for code, tables of contents, includes, figures and tables; kept for notes, warnings and
    API descriptions), field lists of directives, and literal blocks (the indented block after ``::``).
    Inline markup keeps its text: roles, literals, links, emphasis.
    """
    lines = text.expandtabs(8).splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    skip_below: int | None = None  # skip lines indented deeper than this (a block being dropped)
    literal_next = False  # the previous paragraph ended with '::'
    pending_indent = 0  # the indentation of that paragraph: a deeper block after it is literal

    def end():
        nonlocal current
        para = " ".join(" ".join(current).split())
        if para:
            paragraphs.append(para)
        current = []

    for line in lines:
        stripped = line.strip()
        if skip_below is not None:
            if not stripped or _indent(line) > skip_below:
                continue
            skip_below = None
        if not stripped:
            end()
            continue
        if literal_next:
            literal_next = False
            if _indent(line) > pending_indent:
                skip_below = pending_indent
                continue
        m = _DIRECTIVE.match(line)
        if m:
            end()
            name = m.group(2).lower()
            if name in _CODE_DIRECTIVES or name.startswith(("kernel-", "code")):
                skip_below = len(m.group(1))
            continue
        if _EXPLICIT.match(line):  # comment, target, substitution, footnote: dropped with its body
            end()
            skip_below = _indent(line)
            continue
        if _ADORNMENT.match(line) or _TABLE_RULE.match(line):
            end()
            continue
        if _FIELD.match(line) and not current:
            continue
        if stripped == "::":
            end()
            literal_next, pending_indent = True, _indent(line)
            continue
        if stripped.endswith("::"):
            current.append(_rst_inline(stripped[:-1]))
            end()
            literal_next, pending_indent = True, _indent(line)
            continue
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            stripped = stripped.strip("|").replace("|", " ")
        current.append(_rst_inline(stripped))
    end()
    return paragraphs



# --------------------------------------------------------------------------- POD (Perl documentation)

_POD_CODE = re.compile(r"[BCIFSXZLE]<<+\s(.*?)\s>>+|[BCIFSXZLE]<([^<>]*)>", re.S)


def _pod_inline(text: str) -> str:
    def code(m):
        full = m.group(0)
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        kind = full[0]
        if kind == "E":
            return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(inner, "")
        if kind in "XZ":
            return ""
        if kind == "L":
            return inner.split("|", 1)[0] if "|" in inner else inner.split("/", 1)[0] or inner.lstrip("/").strip('"')
        return inner

    for _ in range(8):  # nested codes: innermost first
        new = _POD_CODE.sub(code, text)
        if new == text:
            break
        text = new
    return text


def pod_paragraphs(text: str) -> list[str]:
    """The prose of a POD document: command paragraphs dropped except heading and item text, verbatim
    (indented, code) paragraphs dropped, formatting codes resolved to their text."""
    out = []
    in_pod, skip_format = True, False
    for block in re.split(r"\n\s*\n", text):
        if not block.strip():
            continue
        first = block.lstrip("\n")
        if first.startswith("="):
            cmd, _, rest = first.partition(" ")
            if cmd in ("=cut",):
                in_pod = False
            elif cmd in ("=pod",) or cmd.startswith("=head"):
                in_pod = True
            if cmd == "=begin":
                skip_format = True
            elif cmd == "=end":
                skip_format = False
            if cmd.startswith(("=head", "=item")) and rest.strip() and rest.strip() not in ("*",):
                out.append(" ".join(_pod_inline(rest).split()))
            in_pod = in_pod or cmd != "=cut"
            continue
        if not in_pod or skip_format or first[:1] in (" ", "\t"):
            continue
        para = " ".join(_pod_inline(first).split())
        if para:
            out.append(para)
    return out


# --------------------------------------------------------------------------- dictd dictionaries


def dictd_entries(index_text: str, data: bytes) -> list[str]:
    """The entries of a dictd database (``NAME.index`` + the decompressed ``NAME.dict.dz``), each one
    paragraph, in the order of the data file; the database's own ``00-database-*`` entries are left out."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:
        n = 0
        for ch in s:
            n = n * 64 + digits.index(ch)
        return n

    spans = set()
    for line in index_text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        spans.add((b64(parts[1]), b64(parts[2])))
    entries = []
    for off, length in sorted(spans):
        entry = " ".join(data[off : off + length].decode("utf-8", errors="replace").split())
        if entry:
            entries.append(entry)
    return entries


def plain_paragraphs(text: str) -> list[str]:
    """Paragraphs of plain text: blocks separated by blank lines, whitespace collapsed."""
    return [p for p in (" ".join(b.split()) for b in re.split(r"\n\s*\n", text)) if p]


# --------------------------------------------------------------------------- dispatch

CONVERTERS = {
    "html": html_paragraphs,
    "rst": rst_paragraphs,
    "pod": pod_paragraphs,
    "plain": plain_paragraphs,
}


def converter_for(name: str) -> str | None:
    """The converter of a file name (after removing ``.gz``): ``html``, ``rst``, ``pod`` or ``plain``."""
    base = name[:-3] if name.endswith(".gz") else name
    lower = base.lower()
    if lower.endswith((".html", ".htm", ".xhtml")) or re.search(r"\.html\.[a-z]{2}(-[a-z]{2})?$", lower):
        return "html"
    if lower.endswith((".rst", ".rst.txt", ".txt", ".rest")):
        return "rst"
    if lower.endswith((".pod", ".pm")):
        return "pod"
    return None


def decode(name: str, raw: bytes) -> str:
    if name.endswith((".gz", ".dz")):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")

