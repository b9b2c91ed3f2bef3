"""The set-up scripts and the documentation, as a new user meets them.

- Every link and path reference in the project's documents and recipes resolves inside the
  repository, and nothing the project ships points at files outside it.
- The README's quick-start recipe builds and exports as written.
- tools/demo.sh run again keeps what a user added to its folder, and refuses a folder it did not make.
- tools/env.sh stops when pip fails, installs torch only pinned, from PyTorch's CPU index first
  on a machine without an NVIDIA GPU, and keeps a torch that is already there (run against a
  fake environment whose `pip`, `python` and `nvidia-smi` record what they were asked).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked archive): the files on disk
        return sorted(p for pat in patterns for p in ROOT.glob(pat))
    return [ROOT / line for line in out.stdout.splitlines()]


DOCUMENTS = _tracked("*.md", "**/*.md", "recipes/*.yaml")

# ---------------------------------------------------------------------------------------------
# links and path references

MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
# A path written in prose or code, starting at one of the repository's top-level entries (or a
# package directory, as the README's code tour writes them): `tools/demo.sh`, `docs/methods.md`,
# `checkpoints/blocks.py`. A path right after "/" or "." belongs to something else (`../x`, `/abs`).
PATH_REF = re.compile(r"(?<![\w./~-])((?:[\w.-]+/)+[\w.*-]*)")


def _top_level() -> set[str]:
    """The repository's own top-level folders (not demo/, bench-out/ or .venv/ a run made)."""
    return {p.relative_to(ROOT).parts[0] for p in _tracked("*/*")}


def _packages() -> set[str]:
    return {p.name for p in (ROOT / "streammerge").iterdir() if p.is_dir() and not p.name.startswith("_")}


def _inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def _resolves(ref: str) -> bool:
    """A path reference resolves from the root or, for a package directory, from streammerge/;
    a `*` in it (`routing*.safetensors`) matches any name."""
    ref = ref.rstrip(".,:;")
    for base in (ROOT, ROOT / "streammerge"):
        if "*" in ref:
            if any(base.glob(ref)):
                return True
        elif (base / ref).exists():
            return True
    return False


def test_documents_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCUMENTS}
    assert {"README.md", "docs/methods.md", "recipes/ties.yaml", "recipes/README.md"} <= names


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve_inside_the_repository(doc):
    text = doc.read_text()
    bad = []
    for target in MD_LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        if not (_inside(path) and path.exists()):
            bad.append(f"link {target}")
    starts = _top_level() | _packages()
    for ref in PATH_REF.findall(text):
        if ref.split("/")[0] in starts and not _resolves(ref):
            bad.append(f"path {ref}")
    assert not bad, f"{doc.relative_to(ROOT)}: {bad}"


def test_nothing_shipped_depends_on_files_outside_the_repository():
    shipped = _tracked("*.md", "**/*.md", "*.toml", "recipes/*", "tools/**", "tests/**", "streammerge/**", ".ci/*")
    outside = re.compile(r"\.\./shared|/work/shared|(?<![\w/])METHODS\.md")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in shipped
        if p.is_file() and p != Path(__file__).resolve() and p.suffix not in {".png", ".npz", ".safetensors"}
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits


# ---------------------------------------------------------------------------------------------
# the demo and the README's quick start


def _demo_env() -> dict:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists() or not (venv / "bin" / "streammerge").exists():
        pytest.skip(f"the tests' interpreter is not in a virtual environment with streammerge installed ({venv})")
    # STREAMMERGE_INSTALL=0: the demo uses this environment as it is (no pip); PYTHONPATH makes
    # its `streammerge` commands run this checkout's code.
    return {**os.environ, "STREAMMERGE_VENV": str(venv), "STREAMMERGE_INSTALL": "0", "PYTHONPATH": str(ROOT)}


def _demo(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "tools" / "demo.sh"), "--dir", str(folder)],
        env=_demo_env(), capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "demo"
    run = _demo(folder)
    assert run.returncode == 0, run.stderr[-2000:]
    return folder


def _names(path: Path) -> set[str]:
    with safe_open(str(path), framework="numpy") as f:
        return set(f.keys())


def test_demo_builds_and_exports(demo_dir):
    index = json.loads((demo_dir / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == _names(demo_dir / "models" / "base" / "model.safetensors")
    listed = (demo_dir / ".streammerge-demo").read_text().splitlines()
    assert {"recipe.yaml", "merged/model.safetensors.index.json", "job.zarr/manifest.json"} <= set(listed)


def test_demo_rerun_keeps_what_the_user_added(demo_dir):
    (demo_dir / "notes.txt").write_text("mine")
    (demo_dir / "models" / "mine.txt").write_text("mine too")
    shard = demo_dir / "merged" / "model-00001-of-00003.safetensors"
    stale = demo_dir / "merged" / "stale.safetensors"  # as if an earlier demo had written it
    stale.write_bytes(b"x")
    with (demo_dir / ".streammerge-demo").open("a") as marker:
        marker.write("merged/stale.safetensors\n")
    first = shard.stat().st_mtime_ns

    run = _demo(demo_dir)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (demo_dir / "notes.txt").read_text() == "mine"
    assert (demo_dir / "models" / "mine.txt").read_text() == "mine too"
    assert not stale.exists()  # what the demo wrote is replaced ...
    assert shard.stat().st_mtime_ns != first  # ... by this run's output
    listed = (demo_dir / ".streammerge-demo").read_text().splitlines()
    assert "notes.txt" not in listed and "models/mine.txt" not in listed


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    run = _demo(folder)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: demo.sh: {folder} exists")
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_readme_quick_start_builds(demo_dir, tmp_path):
    """The recipe in the README's "Quick start", on the demo's models, with its commands."""
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):]
    recipe = re.search(r"```yaml\n(.*?)```", quick, re.S).group(1)
    commands = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    (tmp_path / "recipe.yaml").write_text(recipe)
    for name, source in {"base": "base", "math": "ft1", "code": "ft2"}.items():
        shutil.copytree(demo_dir / "models" / source, tmp_path / "models" / name)
    for line in commands.splitlines():
        argv = line.split("#")[0].split()
        assert argv[0] == "streammerge"
        run = subprocess.run([sys.executable, "-m", "streammerge", *argv[1:]], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    assert _names(tmp_path / "merged" / "model.safetensors") == _names(tmp_path / "models" / "base" / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# tools/env.sh against a fake environment

FAKE_PYTHON = """#!/bin/sh
# Answers env.sh's import checks from marker files the fake pip leaves.
v="$(dirname "$0")/.."
case "$*" in
    *"import torch; print"*) cat "$v/installed-torch" ;;
    *"import torch"*) [ -e "$v/installed-torch" ] ;;
    *"import mergekit"*) [ -e "$v/installed-mergekit" ] ;;
    *"import streammerge"*) exit 0 ;;
    *) echo "fake python: unexpected $*" >&2; exit 97 ;;
esac
"""
FAKE_PIP = """#!/bin/sh
# Records its arguments; fails (as pip does, exit 1) when they match $FAKE_PIP_FAIL.
v="$(dirname "$0")/.."
echo "$*" >>"$v/pip.log"
case "$*" in $FAKE_PIP_FAIL) echo "ERROR: fake pip refuses: $*" >&2; exit 1 ;; esac
case "$*" in *torch==*) echo 2.13.0 >"$v/installed-torch" ;; esac
case "$*" in *mergekit*) touch "$v/installed-mergekit" ;; esac
exit 0
"""


def _fake_venv(tmp_path: Path, gpu: bool, torch: bool = False) -> Path:
    venv = tmp_path / "venv"
    bin_ = venv / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    (bin_ / "python").write_text(FAKE_PYTHON)
    (bin_ / "pip").write_text(FAKE_PIP)
    smi = "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'" if gpu else "echo 'NVIDIA-SMI has failed' >&2; exit 9"
    (bin_ / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    if torch:
        (venv / "installed-torch").write_text("2.5.1\n")
    return venv


def _env_sh(venv: Path, fail: str = "__nothing__", extras: str = "test", **more: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {
        **more,
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "STREAMMERGE_VENV": str(venv),
        "STREAMMERGE_EXTRAS": extras,
        "FAKE_PIP_FAIL": fail,
    }
    run = subprocess.run(["bash", str(ROOT / "tools" / "env.sh")], env=env, capture_output=True, text=True, timeout=60)
    log = venv / "pip.log"
    return run, log.read_text().splitlines() if log.exists() else []


def _torch_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if re.search(r"(^|\s)torch\b", c)]


def test_env_cpu_machine_tries_the_cpu_index_first(tmp_path):
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=False))
    assert run.returncode == 0, run.stderr
    (torch,) = _torch_calls(calls)
    assert f"--index-url {CPU_INDEX}" in torch and "torch==2.13.0" in torch
    assert "--retries 0" in torch and int(re.search(r"--timeout (\d+)", torch).group(1)) <= 30
    assert calls.index(torch) == 0  # before anything that depends on torch
    assert any(f"-e {ROOT}[test]" in c for c in calls) and any("mergekit" in c for c in calls)
    assert "installing torch==2.13.0" in run.stderr and run.stderr.strip().endswith(f"ready: {tmp_path / 'venv'}")


def test_env_cpu_index_unreachable_falls_back_to_pips_configuration(tmp_path):
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=False), fail=f"*{CPU_INDEX}*")
    assert run.returncode == 0, run.stderr
    first, second = _torch_calls(calls)
    assert CPU_INDEX in first
    assert "--index-url" not in second and "torch==2.13.0" in second.split()
    assert "trying pip's configured sources" in run.stderr


def test_env_gpu_machine_uses_pips_configuration(tmp_path):
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=True))
    assert run.returncode == 0, run.stderr
    (torch,) = _torch_calls(calls)
    assert "--index-url" not in torch and "torch==2.13.0" in torch.split()


def test_env_keeps_a_torch_already_installed(tmp_path):
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=False, torch=True))
    assert run.returncode == 0, run.stderr
    assert _torch_calls(calls) == []
    assert "torch 2.5.1 is already installed" in run.stderr


def test_env_stops_when_no_torch_can_be_installed(tmp_path):
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=False), fail="*torch==*")
    assert run.returncode == 1
    assert len(_torch_calls(calls)) == 2 and not any("-e " in c for c in calls)
    assert run.stderr.strip().splitlines()[-1].startswith("error: set-up: no torch could be installed (torch==2.13.0)")


@pytest.mark.parametrize("fail", ["*", "*-e *", "*mergekit*"])
def test_env_fails_when_pip_fails(tmp_path, fail):
    """No `|| true`: a failed install fails the set-up, with pip's own message shown."""
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=True), fail=fail)
    assert run.returncode == 1
    assert "ERROR: fake pip refuses" in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: set-up: ")
    assert "ready:" not in run.stderr


def test_env_without_extras_installs_no_torch(tmp_path):
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=False), extras="")
    assert run.returncode == 0, run.stderr
    assert _torch_calls(calls) == [] and calls == [f"install --disable-pip-version-check -q -e {ROOT} tokenizers"]


def test_env_torch_index_can_be_chosen(tmp_path):
    index = "https://download.pytorch.org/whl/cu126"
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=True), STREAMMERGE_TORCH_INDEX=index)
    assert run.returncode == 0, run.stderr
    (torch,) = _torch_calls(calls)
    assert f"--index-url {index}" in torch


def test_env_install_0_uses_the_environment_as_it_is(tmp_path):
    run, calls = _env_sh(_fake_venv(tmp_path, gpu=False), STREAMMERGE_INSTALL="0")
    assert run.returncode == 0, run.stderr
    assert calls == [] and "as it is (STREAMMERGE_INSTALL=0)" in run.stderr
