"""The distribution installs one top-level package, and the demo snapshot is reproducible."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from kctx_debug.cli import demo_snapshot_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (path,) = out.glob("kctx_debug-*.whl")
    return path


@pytest.mark.slow
def test_wheel_holds_only_kctx_debug(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kctx_debug"}
    for sub in ("pagetables", "emulator", "traps", "repl", "arch", "schema", "demo"):
        assert f"kctx_debug/{sub}/__init__.py" in names
    assert "kctx_debug/demo/demo.json" in names
    assert "kctx_debug/schema/snapshot-v1.schema.json" in names


@pytest.mark.slow
def test_installed_wheel_imports_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    # Dependencies come from the development environment, appended after the fresh
    # site-packages (a plain path: its editable-install hooks are not run).
    site = Path(subprocess.check_output([py, "-c", "import site; print(site.getsitepackages()[0])"],
                                        text=True).strip())  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import kctx_debug, kctx_debug.pagetables, kctx_debug.emulator, kctx_debug.traps, "
        "kctx_debug.repl; print(kctx_debug.__file__)"
    )
    out = subprocess.run([py, "-c", code], cwd=tmp_path, check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    assert out.strip().startswith(str(site))
    tops = {p.name.split("-")[0] for p in site.iterdir() if p.is_dir()}
    assert "kctx_debug" in tops
    assert not tops & {"emulator", "repl", "traps", "pagetables", "core"}


def test_demo_snapshot_is_reproducible(tmp_path):
    out = tmp_path / "demo.json"
    subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_demo.py"), str(out)],
                   check=True, capture_output=True)  # fmt: skip
    assert out.read_text() == demo_snapshot_path().read_text()
