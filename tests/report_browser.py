"""Open a report in headless Chromium (Debian's ``chromium``) at a given width and read back what a reader
would see wrong: the page scrolling sideways, a table wider than the window, an image without a caption or
that did not load, a docutils "System Message". Every <details> is opened first, so collapsed tables count."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

CHECK = """<script>
window.addEventListener('load', () => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  const vw = document.documentElement.clientWidth, problems = [];
  const page = document.documentElement.scrollWidth;
  if (page > vw) problems.push(`the page is ${page} px wide in a ${vw} px window`);
  // the page's text column: a table or image past its right edge is wider than the page
  const body = document.body.getBoundingClientRect();
  const column = body.right - parseFloat(getComputedStyle(document.body).paddingRight);
  const tables = document.querySelectorAll('table');
  tables.forEach((t, i) => {
    const r = t.getBoundingClientRect();
    const head = (t.rows[0] ? t.rows[0].innerText : '').replace(/\\s+/g, ' ').slice(0, 60);
    if (r.width > vw || r.right > column + 1 || r.left < -1)
      problems.push(`table ${i} ("${head}") spans ${Math.round(r.left)}-${Math.round(r.right)} px; ` +
                    `the page's column ends at ${Math.round(column)} of ${vw}`);
  });
  const images = document.querySelectorAll('img');
  images.forEach((img, i) => {
    const fig = img.closest('figure'), cap = fig && fig.querySelector('figcaption');
    if (!cap || !cap.innerText.trim()) problems.push(`image ${i} (${img.alt}) has no caption`);
    if (!img.naturalWidth) problems.push(`image ${i} (${img.alt}) did not load`);
    if (img.getBoundingClientRect().right > column + 1) problems.push(`image ${i} (${img.alt}) is wider than the page`);
  });
  if (document.body.innerText.includes('System Message')) problems.push('a docutils System Message');
  const out = document.createElement('pre');
  out.id = 'browser-check';
  out.textContent = JSON.stringify({width: vw, tables: tables.length, images: images.length, problems});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def install_chromium() -> str | None:
    """Debian's chromium, installed with apt where it is missing and this process may (root, apt-get
    present); None where it cannot be."""
    if chromium():
        return chromium()
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True)
    return chromium()


def _flags(width: int, height: int) -> list[str]:
    return [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--allow-file-access-from-files", f"--window-size={width},{height}"]


def check(report: Path, work: Path, width: int = 1280) -> dict:
    """What the check script found in ``report`` rendered ``width`` px wide."""
    page = work / f"{report.parent.name}-check.html"
    page.write_text(report.read_text().replace("</body>", CHECK + "</body>"))
    proc = subprocess.run([*_flags(width, 900), "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="browser-check">(.*?)</pre>', proc.stdout, re.S)
    if not m:
        raise AssertionError(f"chromium printed no check result (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def screenshot(report: Path, png: Path, width: int = 1280, height: int = 2400, anchor: str = "") -> Path:
    """A PNG of the report's window scrolled to ``anchor`` (an element id)."""
    uri = report.resolve().as_uri() + (f"#{anchor}" if anchor else "")
    subprocess.run([*_flags(width, height), f"--screenshot={png}", uri], capture_output=True, timeout=120,
                   check=True)
    return png


def page_shots(report: Path, out_dir: Path, width: int = 1280, height: int = 16000, part: int = 1800) -> list[Path]:
    """The report as one tall screenshot cut into parts of ``part`` px (for reading it as images)."""
    from PIL import Image

    whole = screenshot(report, out_dir / f"{report.parent.name}-page.png", width, height)
    img = Image.open(whole)
    box = img.convert("L").point(lambda v: 255 if v < 250 else 0).getbbox()
    bottom = box[3] if box else img.height
    parts = []
    for k, top in enumerate(range(0, bottom, part)):
        path = out_dir / f"{report.parent.name}-{k:02d}.png"
        img.crop((0, top, width, min(top + part, bottom))).save(path)
        parts.append(path)
    return parts
