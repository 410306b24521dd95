"""What the package ships beside its modules, and, in CI's run against the
built wheel (SMIRROR_TEST_INSTALLED=1, .ci/run), that the smirror under
test is that installed wheel and not this checkout's src/."""
import os
from pathlib import Path

import pytest

import smirror

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(smirror.__file__).resolve().parent


@pytest.mark.parametrize("name", ["py.typed", "kernels/_checksum.pyi", "kernels/_journal.pyi",
                                  "kernels/_memqueue.pyi", "capture/mount/_fuse.pyi"])
def test_typing_files_are_beside_the_modules(name):
    assert (PACKAGE / name).is_file(), f"{name} missing from {PACKAGE}"


@pytest.mark.skipif(os.environ.get("SMIRROR_TEST_INSTALLED") != "1",
                    reason="only CI's run against the installed wheel sets SMIRROR_TEST_INSTALLED=1")
def test_the_smirror_under_test_is_installed_not_the_checkout():
    assert REPO not in PACKAGE.parents, f"smirror comes from the checkout ({PACKAGE}), not the wheel"
    assert list(PACKAGE.glob("kernels/_memqueue*.so")), f"no compiled queue kernel in {PACKAGE}"
    # CI builds with libfuse3-dev (.ci/run): the wheel must hold the mount's binding
    assert list(PACKAGE.glob("capture/mount/_fuse*.so")), f"no FUSE binding in {PACKAGE}"
