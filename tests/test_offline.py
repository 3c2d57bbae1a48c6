"""The offline GPU-host tool (llmpar.offline) on the CPU: pins, the wheelhouse's parts and manifest, the
refusal of a damaged wheelhouse, a real install of small wheels, and the workflow command of `study`.
No wheel is downloaded: the download step is replaced by one that writes the wheels here."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from llmpar import offline
from llmpar.offline import OfflineError

KIB = 1024
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def make_wheel(dest: Path, name: str, version: str, payload: bytes = b"", requires: str = "") -> Path:
    """A minimal installable pure-Python wheel: package ``name`` with ``VALUE = 1``, ``payload`` as data and
    one requirement if ``requires`` names it."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    if requires:
        metadata += f"Requires-Dist: {requires}\n"
    files = {f"{name}/__init__.py": b"VALUE = 1\n", f"{name}/payload.bin": payload,
             f"{info}/METADATA": metadata.encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"]).encode()
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for f, data in files.items():
            z.writestr(f, data)
    return path


@pytest.fixture
def fake_pypi(monkeypatch):
    """fetch_wheel writes a small wheel instead of downloading; sizes (bytes of random payload) by name; the
    wheel ``alpha-pkg`` requires a package no environment has."""
    sizes: dict[str, int] = {}

    def fetch(name, version, python_version, dest):
        requires = "no-such-package-anywhere" if name == "alpha-pkg" else ""
        return make_wheel(dest, name.replace("-", "_"), version, os.urandom(sizes.get(name, 100)), requires)

    monkeypatch.setattr(offline, "fetch_wheel", fetch)
    return sizes


def lock_file(tmp_path: Path) -> Path:
    path = tmp_path / "lock.txt"
    path.write_text("# exact versions\nAlpha_Pkg==1.0\nbeta==2.0\nbig==3.0\n")
    return path


def test_pins_come_from_the_lock_unless_given(tmp_path):
    lock = lock_file(tmp_path)
    reqs = [("r:1", "alpha-pkg"), ("r:2", "beta"), ("--extra", "gamma==0.5")]
    assert offline.resolve_pins(reqs, lock) == [("alpha-pkg", "1.0"), ("beta", "2.0"), ("gamma", "0.5")]
    with pytest.raises(OfflineError, match=r"r:1: delta is not in .*lock.txt; pin it as delta==VERSION"):
        offline.resolve_pins([("r:1", "delta")], lock)
    with pytest.raises(OfflineError, match="--extra: ALPHA.PKG is already named at r:1"):
        offline.resolve_pins([("r:1", "alpha-pkg"), ("--extra", "ALPHA.PKG==9")], lock)
    with pytest.raises(OfflineError, match="r:3: expected NAME or NAME==VERSION"):
        offline.resolve_pins([("r:3", "beta>=2")], lock)


def test_wheelhouse_parts_hold_whole_wheels_and_chunk_the_large_one(tmp_path, fake_pypi):
    fake_pypi.update({"alpha-pkg": 6 * KIB, "beta": 3 * KIB, "big": 25 * KIB})
    out = tmp_path / "wh"
    m = offline.build_wheelhouse(out, [("r", "alpha-pkg"), ("r", "beta"), ("r", "big")], PY, 10 / 1024,
                                 lock_file(tmp_path))
    part_bytes = 10 * KIB
    assert m["part_bytes"] == part_bytes and m["python_version"] == PY
    parts = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in parts] == [f"part-{i:02d}" for i in range(1, m["parts"] + 1)]
    assert all(sum(f.stat().st_size for f in p.iterdir()) <= part_bytes for p in parts)
    by_name = {e["name"]: e for e in m["wheels"]}
    for name in ("alpha-pkg", "beta"):  # whole wheels, each in one part, as listed
        e = by_name[name]
        path = out / e["part"] / e["file"]
        assert path.stat().st_size == e["size"] and hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
    big = by_name["big"]
    assert big["size"] > part_bytes and "part" not in big and len(big["chunks"]) == 3  # random bytes: xz gains nothing
    assert not list(out.glob("part-*/big-*.whl"))
    offline.verify(out, m)
    joined = offline.join_chunks(out, big, tmp_path)
    assert hashlib.sha256(joined.read_bytes()).hexdigest() == big["sha256"]
    with zipfile.ZipFile(joined) as z:
        assert len(z.read("big/payload.bin")) == 25 * KIB
    with pytest.raises(OfflineError, match="is not empty"):
        offline.build_wheelhouse(out, [("r", "beta")], PY, 1, lock_file(tmp_path))


def test_a_damaged_wheelhouse_is_refused_naming_each_file(tmp_path, fake_pypi, monkeypatch):
    fake_pypi.update({"alpha-pkg": 2 * KIB, "beta": 2 * KIB, "big": 25 * KIB})
    out = tmp_path / "wh"
    m = offline.build_wheelhouse(out, [("r", "alpha-pkg"), ("r", "beta"), ("r", "big")], PY, 10 / 1024,
                                 lock_file(tmp_path))
    by_name = {e["name"]: e for e in m["wheels"]}
    chunk = by_name["big"]["chunks"][1]
    chunk_path = out / chunk["part"] / chunk["file"]
    data = bytearray(chunk_path.read_bytes())
    data[100] ^= 0xFF
    chunk_path.write_bytes(bytes(data))
    beta = by_name["beta"]
    (out / beta["part"] / beta["file"]).unlink()
    monkeypatch.setattr(offline.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a} on a damaged wheelhouse"))
    with pytest.raises(OfflineError) as err:
        offline.install(out, tmp_path / "site")
    msg = str(err.value)
    assert f"{chunk['part']}/{chunk['file']} (a chunk of {by_name['big']['file']}): corrupt" in msg
    assert f"{beta['part']}/{beta['file']}: missing (move {beta['part']} too)" in msg
    assert by_name["alpha-pkg"]["file"] not in msg
    assert not (tmp_path / "site").exists()


def test_install_joins_installs_once_and_prints_its_environment(tmp_path, fake_pypi, monkeypatch, capsys):
    fake_pypi.update({"alpha-pkg": 1 * KIB, "big": 25 * KIB})
    wh, site = tmp_path / "wh", tmp_path / "site"
    offline.build_wheelhouse(wh, [("r", "alpha-pkg"), ("r", "big")], PY, 10 / 1024, lock_file(tmp_path))
    env_file = tmp_path / "env.sh"
    lines = offline.install(wh, site, env_file)
    assert len((site / "big" / "payload.bin").read_bytes()) == 25 * KIB  # the chunked wheel, joined
    assert (site / "alpha_pkg" / "__init__.py").is_file()
    assert "alpha-pkg 1.0 requires no-such-package-anywhere, which is not installed" in capsys.readouterr().err
    # `python` is this interpreter with its environment (a venv's packages too, where it is a venv's)
    started = subprocess.run([str(site / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert started == sys.prefix
    assert env_file.read_text().splitlines() == lines
    env = subprocess.run(["bash", "-c", f". {env_file} && env"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "/elsewhere"}, check=True).stdout.splitlines()
    assert f"PYTHONPATH={site}:{offline.REPO / 'src'}:/elsewhere" in env
    assert f"PATH={site / 'bin'}:/usr/bin:/bin" in env
    assert {"NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"} <= set(env)
    monkeypatch.setattr(offline.subprocess, "run", lambda *a, **k: pytest.fail(f"installed again: {a}"))
    assert offline.install(wh, site) == lines


def test_environment_puts_the_folders_of_the_wheels_pth_files_on_the_path(tmp_path):
    """A wheel that works only through its .pth file (nvidia-cutlass-dsl's: an import line that puts its DSL
    packages on sys.path) works from the --target folder, where Python reads no .pth file by itself."""
    site = tmp_path / "site"
    (site / "dslpkg" / "dsl_packages" / "dslcore").mkdir(parents=True)
    (site / "dslpkg" / "__init__.py").write_text("")
    (site / "dslpkg" / "dsl_packages" / "dslcore" / "__init__.py").write_text("VALUE = 7\n")
    (site / "plain" / "lib").mkdir(parents=True)
    (site / "dslpkg.pth").write_text("import sys, os, dslpkg; "
                                     "sys.path.insert(0, os.path.join(dslpkg.__path__[0], 'dsl_packages'))\n")
    (site / "plain.pth").write_text("plain/lib\n")
    env_file = tmp_path / "env.sh"
    env_file.write_text("\n".join(offline.env_lines(site)) + "\n")
    got = subprocess.run(["bash", "-c", f". {env_file} && {sys.executable} -c 'import dslcore; print(dslcore.VALUE)'"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert got.stdout.strip() == "7", got.stderr[-1000:]
    assert str(site / "plain" / "lib") in next(line for line in offline.env_lines(site) if "PYTHONPATH" in line)


def test_a_pth_file_that_fails_is_refused_with_its_error(tmp_path):
    (tmp_path / "broken.pth").write_text("import no_such_module_for_this_pth\n")
    with pytest.raises(OfflineError, match="reading its .pth files failed"):
        offline.env_lines(tmp_path)


def test_quack_installs_only_under_a_site_packages_folder(tmp_path, fake_pypi):
    """quack-kernels tells installed libraries from its own code by a site-packages folder in their path (else its
    gated GEMMs fail on the CUTLASS DSL's globals): a target outside one is refused, naming a target that works."""
    wh = tmp_path / "wh"
    offline.build_wheelhouse(wh, [("r", "quack-kernels==0.6.5"), ("r", "beta")], PY, 1, lock_file(tmp_path))
    with pytest.raises(OfflineError, match=r"quack-kernels must be installed under a folder named site-packages .*"
                                           r"--target .*kernels/site-packages"):
        offline.install(wh, tmp_path / "kernels")
    assert not (tmp_path / "kernels").exists()
    offline.install(wh, tmp_path / "kernels" / "site-packages")
    assert (tmp_path / "kernels" / "site-packages" / "quack_kernels" / "__init__.py").is_file()


def test_install_refuses_another_python(tmp_path, fake_pypi):
    wh = tmp_path / "wh"
    offline.build_wheelhouse(wh, [("r", "beta")], "3.99", 1, lock_file(tmp_path))
    with pytest.raises(OfflineError, match=rf"for Python 3.99, this is {PY} .*--python-version {PY}"):
        offline.install(wh, tmp_path / "site")


def test_study_command_trains_the_named_runs_through_the_workflow():
    cmd = offline.snakemake_command(Path("configs/gpu2-1b.yaml"), "h200x2-1b", ["single", "ddp"])
    assert cmd == ["snakemake", "--cores", "1", "--scheduler", "greedy", "--configfile", "configs/gpu2-1b.yaml",
                   "--config", "recorded=False", "study=h200x2-1b", "--allowed-rules", "train",
                   "--forcerun", "train", "--keep-going", "--",
                   "results/h200x2-1b/runs/single/summary.json", "results/h200x2-1b/runs/ddp/summary.json"]


def test_study_runs_default_to_the_config_and_refuse_unknown_names():
    cfg = {"runs": {"single": {"strategy": "single"}, "ddp": {"strategy": "data_parallel"}}}
    assert offline.study_runs(cfg, Path("c.yaml"), []) == ["single", "ddp"]
    assert offline.study_runs(cfg, Path("c.yaml"), ["ddp"]) == ["ddp"]
    with pytest.raises(OfflineError, match=r"c.yaml has no run fsdp \(its runs: single, ddp\)"):
        offline.study_runs(cfg, Path("c.yaml"), ["ddp", "fsdp"])
    cfg["runs"]["ddp"]["gpus_per_node"] = [1, 2]
    with pytest.raises(OfflineError, match="c.yaml sweeps ddp: name the expanded runs with --runs"):
        offline.study_runs(cfg, Path("c.yaml"), [])
    assert offline.study_runs(cfg, Path("c.yaml"), ["ddp-g2"]) == ["ddp-g2"]


def test_study_without_token_shards_stops_before_the_workflow(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("study: s1\nruns: {single: {strategy: single}}\n")
    monkeypatch.setattr(offline.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    with pytest.raises(OfflineError, match=r"results/s1/data/tokens/meta.json is missing: build the token shards"):
        offline.study(config, [], None, tmp_path / "out", repo=tmp_path)
    assert not (tmp_path / "out").exists()


def test_card_names_the_outputs():
    assert offline.card_slug("NVIDIA H100 80GB HBM3", 2) == "h100-80gb-hbm3x2"
    assert offline.card_slug("NVIDIA H200", 1) == "h200x1"


def test_study_packs_runs_without_checkpoints_and_tabulates_them(tmp_path):
    run = tmp_path / "results" / "s1" / "runs" / "ddp"
    (run / "checkpoints" / "step_00000003").mkdir(parents=True)
    (run / "checkpoints" / "step_00000003" / "model.pt").write_bytes(b"weights")
    (run / "summary.json").write_text('{"status": "ok", "tokens_per_s": 122688.6, "mfu": 0.4193, '
                                      '"peak_mem_gib": 52.64, "final_loss": 1.17595}')
    (run / "steps.jsonl").write_text("{}\n")
    (tmp_path / "logs" / "s1" / "train").mkdir(parents=True)
    (tmp_path / "logs" / "s1" / "train" / "ddp.log").write_text("trained\n")
    log = tmp_path / "snakemake_s1.log"
    log.write_text("done\n")
    archive = tmp_path / "runs_s1.tgz"
    offline.pack_runs(archive, tmp_path, "s1", ["ddp", "zero3"], [log])
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["logs/s1/train/ddp.log", "results/s1/runs/ddp",
                                          "results/s1/runs/ddp/steps.jsonl", "results/s1/runs/ddp/summary.json",
                                          "snakemake_s1.log"]
    table = offline.run_table(tmp_path / "results" / "s1" / "runs", ["ddp", "zero3"]).splitlines()
    assert table[1].split() == ["ddp", "ok", "122,689", "0.419", "52.6", "1.1760"]
    assert table[2].split() == ["zero3", "missing"]
