"""Fixtures shared by the engine tests."""
import pytest

from smirror.capture import fanotify

FANOTIFY_MISSING = fanotify.unavailable_reason()


@pytest.fixture(params=["inotify", "fanotify"])
def backend(request):
    """Each watcher backend in turn (fanotify skipped, saying why, where unavailable)."""
    if request.param == "fanotify" and FANOTIFY_MISSING:
        pytest.skip(f"fanotify unavailable: {FANOTIFY_MISSING}")
    return request.param
