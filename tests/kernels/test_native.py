"""The runtime uses the compiled kernels, never a silent pure-Python fallback."""
import importlib
import subprocess
import sys

import pytest

import smirror
from smirror.cli.main import version_text


@pytest.mark.parametrize("name", smirror.KERNELS)
def test_kernel_is_compiled(name):
    mod = importlib.import_module(f"smirror.kernels.{name}")
    assert mod.__file__.endswith(".so"), f"{name} loaded from {mod.__file__}, not a compiled module"


def test_native_status_reports_all_loaded():
    assert all(v is True for v in smirror.native_status().values()), smirror.native_status()


@pytest.mark.parametrize("facade_name, name", [
    ("checksum", "checksum"), ("frames", "journal"), ("memqueue", "memqueue")])
def test_facades_import_compiled_not_reference(facade_name, name):
    import ast
    facade = importlib.import_module(f"smirror.kernels.{facade_name}")
    tree = ast.parse(open(facade.__file__).read())
    imported = {f"{node.module or ''}.{a.name}" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for a in node.names}
    imported |= {(node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(m.endswith(f"_{name}_py") for m in imported), \
        f"smirror.kernels.{facade_name} must not import its pure-Python reference"
    assert any(m.endswith(f"_{name}") for m in imported), \
        f"smirror.kernels.{facade_name} must use the compiled kernel"


def test_version_command_says_native_loaded():
    out = subprocess.run([sys.executable, "-m", "smirror", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"smirror {smirror.__version__}")
    assert "native kernels loaded" in out and "MISSING" not in out
    assert out.strip() == version_text()
