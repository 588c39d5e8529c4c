"""The package as users get it: a wheel and an sdist that pass ``twine check``, holding every
config and ``py.typed``, and a wheel that runs ``m3i-pretrain`` from a folder outside the
repository; and the docs site, which builds with warnings as errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, TINY_RUN

PACKAGE = REPO / "src" / "m3i_lightning"
DEPENDENCIES = Path(sys.executable).parents[1] / "lib" / \
    f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def shipped_data() -> set[str]:
    """The package's files that are not Python: the configs and ``py.typed``."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")}


def command(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


def test_wheel_and_sdist_pass_twine_and_the_wheel_runs_outside_the_repository(tmp_path):
    """Built from a copy of the source (nothing written into the repository), with the locked
    setuptools; installed without dependencies into a new venv that reads the locked ones
    from the project's environment (a path, so its editable install of the package is not
    seen); ``m3i-pretrain`` then trains two steps from an empty folder."""
    pytest.importorskip("build")
    pytest.importorskip("twine")
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    command(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), ".",
            cwd=source)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    command(sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist),
            cwd=tmp_path)
    data = shipped_data()
    assert "py.typed" in data and "conf/experiment/cpu/m3i.yaml" in data
    wheel_files = {n.removeprefix("m3i_lightning/") for n in zipfile.ZipFile(wheel).namelist()}
    assert data <= wheel_files
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/src/m3i_lightning/"
    with tarfile.open(sdist) as archive:
        sdist_files = {n.removeprefix(prefix) for n in archive.getnames()}
    assert data <= sdist_files

    venv = tmp_path / "venv"
    command(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "locked_dependencies.pth").write_text(f"{DEPENDENCIES}\n")
    command(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
            "--no-deps", "--no-index", "--quiet", str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = command(str(venv / "bin" / "python"), "-c",
                    "import m3i_lightning; print(m3i_lightning.__file__)", cwd=elsewhere)
    assert where.stdout.strip().startswith(str(site))
    command(str(venv / "bin" / "m3i-pretrain"), *TINY_RUN, "trainer.max_steps=2",
            "hydra.run.dir=run", cwd=elsewhere)
    assert (elsewhere / "run" / "checkpoints" / "last.ckpt").is_file()


def test_docs_site_builds_with_warnings_as_errors(tmp_path):
    """``make docs``'s build (mkdocs --strict: a broken link, a page outside the navigation or a
    docstring griffe cannot read fails it), into a temporary folder."""
    pytest.importorskip("mkdocs")
    command(sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
            str(tmp_path / "site"), cwd=REPO)
    for page in ("index.html", "objectives/mim_feat/index.html", "api/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
