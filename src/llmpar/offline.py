"""The study on a GPU host without internet: its Python packages moved as a wheelhouse, then the study's
training jobs and the GPU test suite run there. Standard library and PyYAML only, so that it runs on the
host before anything is installed.

On a machine with PyPI:

    python scripts/offline.py wheelhouse --out wheelhouse            # parts of at most 60 MiB each

On the GPU host, with the checkout, the wheelhouse (all its parts, under one folder) and the token
shards (results/<study>/data/tokens, built by the data rules on any machine):

    python3 scripts/offline.py install --wheelhouse wheelhouse --target /tmp/llmpar-site --env-file env.sh
    . ./env.sh
    python scripts/offline.py study --config configs/gpu2-1b.yaml --runs single ddp --out out
    python scripts/offline.py test-gpu --out out -k fsdp

A wheelhouse is a folder of parts (``part-01/`` ...), each at most ``--part-mib`` MiB, and
``manifest.json`` (each wheel's name, version, sha256 and size, and where it lies). A wheel larger than
a part is xz-compressed and cut into chunks that ``install`` joins and checks again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock.txt"
HOST_REQUIREMENTS = REPO / "requirements" / "gpu-host.txt"
MANIFEST = "manifest.json"
MARKER = ".llmpar-wheelhouse"
MIB = 2**20
# NVLink multicast off in NCCL, PyTorch and NVSHMEM (as `make test-gpu` sets it)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:==([A-Za-z0-9.+!_-]+))?$")


class OfflineError(Exception):
    """Bad input or a failed step, said before (or instead of) any further work."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- which wheels

def spec_lines(path: Path) -> list[tuple[str, str]]:
    """(where, spec) for each non-comment line of a requirements file."""
    if not path.is_file():
        raise OfflineError(f"{path}: no such file")
    return [(f"{path}:{i}", line.split("#", 1)[0].strip()) for i, line in enumerate(path.read_text().splitlines(), 1)
            if line.split("#", 1)[0].strip()]


def resolve_pins(requirements: list[tuple[str, str]], lock: Path) -> list[tuple[str, str]]:
    """(name, version) for each requirement: NAME takes its version from the lock file, NAME==VERSION its own.
    A name given twice, a name the lock lacks or a malformed line is an error."""
    locked = {}
    for where, spec in spec_lines(lock):
        m = SPEC.match(spec)
        if not m or not m.group(2):
            raise OfflineError(f"{where}: expected NAME==VERSION, got {spec!r}")
        locked[canonical(m.group(1))] = m.group(2)
    pins: dict[str, tuple[str, str, str]] = {}
    for where, spec in requirements:
        m = SPEC.match(spec)
        if not m:
            raise OfflineError(f"{where}: expected NAME or NAME==VERSION, got {spec!r}")
        name, version = m.group(1), m.group(2)
        key = canonical(name)
        if version is None:
            if key not in locked:
                raise OfflineError(f"{where}: {name} is not in {lock}; pin it as {name}==VERSION")
            version = locked[key]
        if key in pins:
            raise OfflineError(f"{where}: {name} is already named at {pins[key][2]}")
        pins[key] = (name, version, where)
    return [(name, version) for name, version, _ in pins.values()]


def wheel_identity(filename: str) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name."""
    parts = filename[:-len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise OfflineError(f"{filename}: not a wheel file name")
    return canonical(parts[0]), parts[1]


def fetch_wheel(name: str, version: str, python_version: str, dest: Path) -> Path:
    """Download NAME==VERSION's wheel for CPython ``python_version`` on manylinux x86_64 into ``dest``; a
    package published only as an sdist is built here as a pure-Python wheel (DeepSpeed: DS_BUILD_OPS=0,
    its CUDA ops are compiled on the GPU host when first used)."""
    spec = f"{name}=={version}"
    pip = [sys.executable, "-m", "pip"]
    abi = "cp" + python_version.replace(".", "")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
               *[a for p in PLATFORMS for a in ("--platform", p)], "-d", tmp, spec]
        got = subprocess.run(cmd, capture_output=True, text=True)
        built = got.returncode != 0
        if built:
            got = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, spec],
                                 capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"})
            if got.returncode != 0:
                raise OfflineError(f"{spec}: no wheel for Python {python_version} on manylinux x86_64, and building "
                                   f"one from its sdist failed:\n{got.stderr[-2000:]}")
        files = list(Path(tmp).glob("*.whl"))
        if len(files) != 1:
            raise OfflineError(f"{spec}: expected one wheel, pip left {sorted(f.name for f in files)}")
        wheel = files[0]
        if wheel_identity(wheel.name) != (canonical(name), version):
            raise OfflineError(f"{spec}: pip returned {wheel.name}")
        if built and not wheel.name.endswith("-none-any.whl"):
            raise OfflineError(f"{spec}: the wheel built from its sdist, {wheel.name}, is not pure Python and would "
                               "not run on another platform")
        return Path(shutil.move(str(wheel), dest / wheel.name))


# ---------------------------------------------------------------- parts and manifest

def pack_parts(wheels: list[Path], out: Path, part_bytes: int) -> dict:
    """Move ``wheels`` into parts ``out/part-NN/`` of at most ``part_bytes`` each (first fit, largest first;
    a wheel larger than a part is xz-compressed and cut into chunks) and return the manifest's entries."""
    entries, pieces = [], []  # pieces: (size, path, record whose "part" is set)
    for wheel in sorted(wheels):
        name, version = wheel_identity(wheel.name)
        entry = {"name": name, "version": version, "file": wheel.name, "sha256": sha256(wheel),
                 "size": wheel.stat().st_size}
        entries.append(entry)
        if entry["size"] <= part_bytes:
            pieces.append((entry["size"], wheel, entry))
            continue
        packed = wheel.with_name(wheel.name + ".xz")
        with open(wheel, "rb") as src, lzma.open(packed, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, MIB)
        wheel.unlink()
        entry["chunks"] = []
        with open(packed, "rb") as f:
            for i, data in enumerate(iter(lambda: f.read(part_bytes), b"")):
                chunk = packed.with_name(f"{packed.name}.{i:03d}")
                chunk.write_bytes(data)
                record = {"file": chunk.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                entry["chunks"].append(record)
                pieces.append((len(data), chunk, record))
        packed.unlink()
    bins: list[list] = []  # [free bytes, pieces]
    for size, path, record in sorted(pieces, key=lambda p: (-p[0], p[1].name)):
        target = next((b for b in bins if b[0] >= size), None)
        if target is None:
            target = [part_bytes, []]
            bins.append(target)
        target[0] -= size
        target[1].append((path, record))
    for i, (_, members) in enumerate(bins, 1):
        part = out / f"part-{i:02d}"
        part.mkdir(parents=True)
        for path, record in members:
            shutil.move(str(path), part / path.name)
            record["part"] = part.name
    return {"parts": len(bins), "wheels": entries}


def build_wheelhouse(out: Path, requirements: list[tuple[str, str]], python_version: str, part_mib: float,
                     lock: Path = LOCK) -> dict:
    if part_mib <= 0:
        raise OfflineError(f"--part-mib must be positive, got {part_mib}")
    if not re.fullmatch(r"3\.\d+", python_version):
        raise OfflineError(f"--python-version must look like 3.12, got {python_version!r}")
    pins = resolve_pins(requirements, lock)
    if out.exists() and any(out.iterdir()):
        raise OfflineError(f"{out} is not empty: remove it or name another folder")
    out.mkdir(parents=True, exist_ok=True)
    download = out / ".download"
    download.mkdir()
    for i, (name, version) in enumerate(pins, 1):
        print(f"[{i}/{len(pins)}] {name}=={version}", flush=True)
        fetch_wheel(name, version, python_version, download)
    manifest = {"python_version": python_version, "platforms": list(PLATFORMS), "part_bytes": int(part_mib * MIB),
                **pack_parts(sorted(download.glob("*.whl")), out, int(part_mib * MIB))}
    download.rmdir()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------- install

def load_manifest(wheelhouse: Path) -> tuple[dict, str]:
    path = wheelhouse / MANIFEST
    if not path.is_file():
        raise OfflineError(f"{path} is missing: move the wheelhouse's {MANIFEST} with its parts")
    data = path.read_bytes()
    return json.loads(data), hashlib.sha256(data).hexdigest()


def verify(wheelhouse: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its size and sha256; else one error naming each missing or
    corrupt file, its part and its wheel."""
    problems = []
    for entry in manifest["wheels"]:
        for record in entry.get("chunks") or [entry]:
            path = wheelhouse / record["part"] / record["file"]
            what = f"{record['part']}/{record['file']}" + ("" if record is entry else f" (a chunk of {entry['file']})")
            if not path.is_file():
                problems.append(f"{what}: missing (move {record['part']} too)")
            elif path.stat().st_size != record["size"]:
                problems.append(f"{what}: {path.stat().st_size} bytes, the manifest says {record['size']}")
            elif sha256(path) != record["sha256"]:
                problems.append(f"{what}: corrupt (sha256 differs from the manifest's)")
    if problems:
        raise OfflineError(f"{wheelhouse} is incomplete or damaged; nothing was installed:\n  " + "\n  ".join(problems))


def join_chunks(wheelhouse: Path, entry: dict, dest: Path) -> Path:
    """Rebuild a chunked wheel in ``dest`` (chunks concatenated, xz-decompressed) and check its sha256."""
    path = dest / entry["file"]
    decompressor = lzma.LZMADecompressor()
    with open(path, "wb") as out:
        for record in entry["chunks"]:
            out.write(decompressor.decompress((wheelhouse / record["part"] / record["file"]).read_bytes()))
    if not decompressor.eof or sha256(path) != entry["sha256"]:
        raise OfflineError(f"{entry['file']}: joined from its chunks it does not match the manifest's sha256")
    return path


def pth_folders(target: Path) -> list[str]:
    """The folders that the installed wheels' ``.pth`` files put on ``sys.path``, as Python would for a site
    folder: it reads ``.pth`` files only in its site folders, not in ``target`` on PYTHONPATH, and some wheels
    work only through theirs (nvidia-cutlass-dsl's puts its DSL packages, which flash-attn-4 imports, on the
    path). Found by letting ``site`` read them in a child interpreter."""
    if not any(target.glob("*.pth")):
        return []
    code = ("import site, sys; before = list(sys.path); site.addsitedir(sys.argv[1]); "
            "print('\\n'.join(p for p in sys.path if p not in before and p != sys.argv[1]))")
    got = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    if got.returncode != 0 or "Error processing line" in got.stderr:
        raise OfflineError(f"{target}: reading its .pth files failed:\n{got.stderr[-2000:]}")
    return got.stdout.splitlines()


def env_lines(target: Path, repo: Path = REPO) -> list[str]:
    """Shell lines that put the installed packages (and the folders their ``.pth`` files add), the checkout's
    package and ``python`` first."""
    folders = [str(target), *pth_folders(target), str(repo / "src")]
    path, bin_dir = shlex.quote(":".join(folders)), shlex.quote(str(target / "bin"))
    return [
        f'export PYTHONPATH={path}"${{PYTHONPATH:+:$PYTHONPATH}}"',
        f'export PATH={bin_dir}":$PATH"',
        "export " + " ".join(f"{k}={v}" for k, v in NO_MULTICAST.items()),
    ]


def unmet_requirements(target: Path, names: set[str]) -> list[str]:
    """`pip check`'s complaints about the installed wheels' own requirements (with ``target`` on the path)."""
    got = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    return [line for line in got.stdout.splitlines() if line.split() and canonical(line.split()[0]) in names]


# Wheels whose code tells installed libraries from its own by a site-packages or dist-packages folder in their
# path. quack-kernels 0.6.5 keys its compiled GEMM epilogues by their source and, through every function they call
# outside such a folder, those functions' globals (quack/gemm_runtime/identity.py, _is_extern_function): installed
# under another folder, the CUTLASS DSL's functions count as its own, and the first gated GEMM fails with
# "epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS' ...> which has no fail-closed semantic key".
SITE_FOLDERS = ("site-packages", "dist-packages")
PATH_SENSITIVE = ("quack-kernels",)


def install(wheelhouse: Path, target: Path, env_file: Path | None = None) -> list[str]:
    """Install the wheelhouse into ``target`` with this interpreter's pip (no index, no dependencies resolved:
    the wheelhouse is the whole set). A second call with the same manifest installs nothing."""
    manifest, digest = load_manifest(wheelhouse)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python_version"] != here:
        raise OfflineError(f"the wheelhouse is for Python {manifest['python_version']}, this is {here} "
                           f"({sys.executable}); build it with --python-version {here}")
    sensitive = sorted(e["name"] for e in manifest["wheels"] if e["name"] in PATH_SENSITIVE)
    if sensitive and not set(SITE_FOLDERS) & set(target.absolute().parts):
        raise OfflineError(f"{target}: {', '.join(sensitive)} must be installed under a folder named "
                           f"{' or '.join(SITE_FOLDERS)} (it tells installed libraries from its own code by that "
                           f"folder in their path); use e.g. --target {target / 'site-packages'}")
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == digest:
        print(f"{target}: this wheelhouse is installed already", file=sys.stderr)
    else:
        verify(wheelhouse, manifest)
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wheels = [join_chunks(wheelhouse, e, Path(tmp)) if e.get("chunks") else wheelhouse / e["part"] / e["file"]
                      for e in manifest["wheels"]]
            got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                  "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                                  *map(str, wheels)], capture_output=True, text=True)
        if got.returncode != 0:
            raise OfflineError(f"pip install into {target} failed:\n{got.stderr[-3000:]}")
        marker.write_text(digest + "\n")
        print(f"{target}: installed {len(wheels)} wheels", file=sys.stderr)
        unmet = unmet_requirements(target, {e["name"] for e in manifest["wheels"]})
        if unmet:
            print(f"{target}: requirements neither this host nor the wheelhouse provides (add them with --extra, "
                  "or install them on the host):\n  " + "\n  ".join(unmet), file=sys.stderr)
    # The workflow's rules call `python`: the interpreter the wheels were installed for, started by its own path.
    # A symlink would not do where that interpreter is a virtual environment's: Python finds its environment
    # (pyvenv.cfg) beside the path it was started by, so through a link elsewhere it starts as the base
    # interpreter, without the environment's packages (torch).
    python = target / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.unlink(missing_ok=True)
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    lines = env_lines(target)
    if env_file:
        env_file.write_text("\n".join(lines) + "\n")
    return lines


# ---------------------------------------------------------------- study

def study_runs(config: dict, path: Path, runs: list[str]) -> list[str]:
    """The runs to train: those named, else every run of the config. A config that sweeps a run (a list
    value) expands names only the workflow knows: then the runs must be named (the workflow checks them)."""
    table = config.get("runs") or {}
    sweeps = sorted(r for r, entry in table.items() if any(isinstance(v, list) for v in (entry or {}).values()))
    if sweeps:
        if not runs:
            raise OfflineError(f"{path} sweeps {', '.join(sweeps)}: name the expanded runs with --runs")
        return runs
    unknown = [r for r in runs if r not in table]
    if unknown:
        raise OfflineError(f"{path} has no run {', '.join(unknown)} (its runs: {', '.join(table)})")
    return runs or list(table)


def snakemake_command(config: Path, study: str, runs: list[str]) -> list[str]:
    """The workflow on this host for the named runs' training jobs only: the token shards as they are
    (--allowed-rules train: no corpus or tokenizer rebuild), the named runs trained again even where a
    summary exists, one job at a time, Snakemake's greedy scheduler (pulp, which the ILP scheduler needs, is
    not in the wheelhouse)."""
    targets = [f"results/{study}/runs/{run}/summary.json" for run in runs]
    return ["snakemake", "--cores", "1", "--scheduler", "greedy", "--configfile", str(config),
            "--config", "recorded=False", f"study={study}", "--allowed-rules", "train", "--forcerun", "train",
            "--keep-going", "--", *targets]


def run_table(runs_dir: Path, runs: list[str]) -> str:
    def num(s, key, fmt):
        return format(s[key], fmt) if isinstance(s.get(key), (int, float)) else "-"

    lines = [f"{'run':<20}{'status':<10}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}{'final loss':>12}"]
    for run in runs:
        path = runs_dir / run / "summary.json"
        if not path.is_file():
            lines.append(f"{run:<20}{'missing':<10}")
            continue
        s = json.loads(path.read_text())
        lines.append(f"{run:<20}{s.get('status', '-'):<10}{num(s, 'tokens_per_s', ',.0f'):>11}"
                     f"{num(s, 'mfu', '.3f'):>7}{num(s, 'peak_mem_gib', '.1f'):>10}{num(s, 'final_loss', '.4f'):>12}"
                     f"  {s.get('message', '')[:80]}")
    return "\n".join(lines)


def pack_runs(archive: Path, repo: Path, study: str, runs: list[str], extra: list[Path]) -> None:
    """One archive of the runs' folders (checkpoints left out), their training logs and ``extra`` files, with
    paths relative to the checkout (unpack it over another checkout)."""
    def no_checkpoints(info):
        return None if "checkpoints" in info.name.split("/") else info

    with tarfile.open(archive, "w:gz") as tar:
        for rel in [f"results/{study}/runs/{r}" for r in runs] + [f"logs/{study}/train/{r}.log" for r in runs]:
            if (repo / rel).exists():
                tar.add(repo / rel, arcname=rel, filter=no_checkpoints)
        for path in extra:
            tar.add(path, arcname=path.name)


def study(config: Path, runs: list[str], study_name: str | None, out: Path, repo: Path = REPO) -> int:
    import yaml

    if not config.is_file():
        raise OfflineError(f"{config}: no such config")
    cfg = yaml.safe_load(config.read_text()) or {}
    if not cfg.get("study"):
        raise OfflineError(f"{config} names no study")
    runs = study_runs(cfg, config, runs)
    name = study_name or cfg["study"]
    tokens = repo / "results" / name / "data" / "tokens"
    source = repo / "results" / cfg["study"] / "data" / "tokens"
    if not (tokens / "meta.json").is_file() and (source / "meta.json").is_file():
        shutil.copytree(source, tokens, dirs_exist_ok=True)  # another study name, the config's token shards
    if not (tokens / "meta.json").is_file():
        data = f"results/{cfg['study']}/data/tokens"
        raise OfflineError(f"{data}/meta.json is missing: build the token shards on any machine with the project "
                           f"environment (snakemake --cores 2 --configfile {config} --config recorded=False -- "
                           f"{data}/meta.json) and bring {data}")
    if shutil.which("snakemake") is None:
        raise OfflineError("snakemake is not on PATH: install the wheelhouse and source its environment first")
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"snakemake_{name}.log"
    cmd = snakemake_command(config.resolve(), name, runs)
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT).returncode
    table = run_table(repo / "results" / name / "runs", runs)
    (out / f"table_{name}.txt").write_text(table + "\n")
    pack_runs(out / f"runs_{name}.tgz", repo, name, runs, [log])
    print(table)
    print(f"snakemake exit status {rc}; log {log}; runs in {out / f'runs_{name}.tgz'}")
    return rc


# ---------------------------------------------------------------- GPU test suite

VERSIONS = """
import json, sys
import torch
def version(name):
    try:
        return __import__(name).__version__
    except Exception as exc:
        return f"not importable: {type(exc).__name__}"
n = torch.cuda.device_count()
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if n else None,
                  "transformers": version("transformers"), "deepspeed": version("deepspeed"),
                  "gpu_name": torch.cuda.get_device_name(0) if n else None, "gpu_count": n}))
"""


def card_slug(name: str, count: int) -> str:
    """'NVIDIA H100 80GB HBM3', 2 -> 'h100-80gb-hbm3x2'."""
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"^nvidia\s+", "", name.lower())).strip("-") + f"x{count}"


def test_gpu(pytest_args: list[str], out: Path, repo: Path = REPO) -> int:
    got = subprocess.run([sys.executable, "-c", VERSIONS], capture_output=True, text=True, cwd=repo)
    if got.returncode != 0:
        raise OfflineError(f"{sys.executable} could not report its versions:\n{got.stderr[-2000:]}")
    versions = json.loads(got.stdout.strip().splitlines()[-1])
    if not versions["gpu_count"]:
        raise OfflineError(f"no CUDA GPU is visible to {sys.executable} (torch {versions['torch']})")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"test_gpu_{card_slug(versions['gpu_name'], versions['gpu_count'])}"
    Path(f"{stem}_versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    addopts = shlex.join(["-p", "no:cacheprovider", "-s", f"--basetemp={out / 'gpu-suite'}", *pytest_args])
    env = {**os.environ, **NO_MULTICAST, "PYTEST_ADDOPTS": addopts}
    with open(f"{stem}.txt", "w") as f:
        rc = subprocess.run(["make", "test-gpu", f"GPU_PYTHON={sys.executable}"], cwd=repo, env=env,
                            stdout=f, stderr=subprocess.STDOUT).returncode
    last = Path(f"{stem}.txt").read_text().strip().splitlines()[-1:]
    print(f"{stem}.txt: {last[0] if last else '(no output)'} (exit status {rc})")
    return rc


# ---------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offline.py", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheelhouse", help="on a machine with PyPI: download the wheels a GPU host lacks, in parts")
    w.add_argument("--out", type=Path, required=True, help="folder to create (must be empty or absent)")
    w.add_argument("--python-version", default="3.12", help="the GPU host's Python (default 3.12)")
    w.add_argument("--requirements", type=Path, default=HOST_REQUIREMENTS,
                   help="names (version from requirements/lock.txt) or NAME==VERSION, one a line "
                        "(default requirements/gpu-host.txt)")
    w.add_argument("--extra", action="append", default=[], metavar="NAME==VER", help="one more pin (repeatable)")
    w.add_argument("--part-mib", type=float, default=60, help="largest part, MiB (default 60)")
    i = sub.add_parser("install", help="on the GPU host: check the wheelhouse, install it, print its environment")
    i.add_argument("--wheelhouse", type=Path, required=True)
    i.add_argument("--target", type=Path, required=True, help="folder to install into")
    i.add_argument("--env-file", type=Path, help="write the environment's shell lines here instead of stdout")
    s = sub.add_parser("study", help="train a study's runs through the workflow here, pack them into --out")
    s.add_argument("--config", type=Path, required=True)
    s.add_argument("--runs", nargs="+", default=[], metavar="RUN", help="default: every run of the config")
    s.add_argument("--study", help="results/<STUDY>/ instead of the config's study (e.g. another card)")
    s.add_argument("--out", type=Path, default=Path("offline-out"), help="where the archive, log and table go")
    t = sub.add_parser("test-gpu", help="make test-gpu with this Python; output and versions named by card")
    t.add_argument("--out", type=Path, default=Path("offline-out"))
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    if rest and args.cmd != "test-gpu":
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.cmd == "wheelhouse":
            reqs = spec_lines(args.requirements) + [(f"--extra {e}", e) for e in args.extra]
            m = build_wheelhouse(args.out, reqs, args.python_version, args.part_mib)
            total = sum(e["size"] for e in m["wheels"])
            print(f"{args.out}: {len(m['wheels'])} wheels, {total / MIB:.1f} MiB in {m['parts']} part(s)")
        elif args.cmd == "install":
            lines = install(args.wheelhouse, args.target, args.env_file)
            if not args.env_file:
                print("\n".join(lines))
        elif args.cmd == "study":
            return study(args.config, args.runs, args.study, args.out)
        else:
            return test_gpu(rest, args.out)
    except OfflineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
