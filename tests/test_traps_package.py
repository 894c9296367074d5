"""The package's public names: each is the submodule's own object, loaded on first use."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import kctx_debug.traps as traps


def test_every_exported_name_is_the_defining_modules_object() -> None:
    assert len(traps.__all__) == len(set(traps.__all__)) == 34
    for name in traps.__all__:
        module = importlib.import_module(f"kctx_debug.traps.{traps._EXPORTS[name]}")
        assert getattr(traps, name) is getattr(module, name), name
        assert name in module.__all__, name
    assert traps.Debugger.__module__ == "kctx_debug.traps.debugger"
    from kctx_debug.traps.expr import MappingEnv

    env = MappingEnv(registers={"rax": 5})
    assert traps.evaluate(traps.parse_expression("$rax * 3 + 1"), env) == 16
    assert set(traps.__all__) <= set(dir(traps))


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = traps.nothing


def test_importing_the_package_loads_no_emulator() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, kctx_debug.traps as t; t.TrapKind; "
         "print(sorted(m for m in ('unicorn', 'capstone', 'kctx_debug.emulator') "
         "if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout == "[]\n"
