"""The README's snippets say what the files say."""

import re

import yaml

from llmpar.paths import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def leaves(tree, path=()):
    """(path, value) of every leaf of a nested mapping."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, (*path, key))
    else:
        yield path, tree


def test_config_snippet_matches_config_yaml():
    """Every value the README's study snippet shows is config.yaml's value at that key."""
    section = README.split("## The study", 1)[1]
    snippet = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    config = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    shown = list(leaves(snippet))
    assert len(shown) > 10
    for path, value in shown:
        actual = config
        for key in path:
            actual = actual[key]
        assert actual == value, f"README shows {'.'.join(path)}: {value!r}, config.yaml has {actual!r}"


def test_presets_name_their_report():
    """A preset's report directory is named by its study, which the README says for each preset."""
    for preset in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        study = yaml.safe_load(preset.read_text())["study"]
        assert f"`configs/{preset.name}`" in README and f"report/{study}/report.html" in README, preset.name


def test_captions_render_without_a_docutils_warning():
    """Every caption is valid RST: docutils renders it without a System Message (which the report and
    `snakemake --report` would otherwise show to the reader)."""
    from docutils.core import publish_parts

    captions = sorted((REPO_ROOT / "report" / "captions").glob("*.rst"))
    assert len(captions) >= 10
    for path in captions:
        body = publish_parts(path.read_text(), writer="html")["body"]
        assert "System Message" not in body, path.name
