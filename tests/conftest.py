"""The suite in three levels, each a directory:

    kernels/      one compiled kernel or its facade, alone (both twins)
    engine/       engine pieces in this one process (loopback sockets, rsync as the oracle)
    integration/  daemons and other smirror processes on 127.0.0.1

Shared helpers are the ``support`` package (tests/support/): pytest puts this
directory on sys.path because it holds this conftest and no __init__.py.
``-m "not slow"`` leaves out the tests marked slow (more than ~5 s).
"""
import pytest

import smirror.kernels._memqueue as native_queue
import smirror.kernels._memqueue_py as reference_queue
from smirror.kernels import memqueue
from smirror.stream import receiver

# modules that build a SpillQueue by the name they imported
_QUEUE_USERS = (memqueue, receiver)


@pytest.fixture(params=[pytest.param(native_queue, id="cython-queue"),
                        pytest.param(reference_queue, id="python-queue")])
def queue_impl(request, monkeypatch):
    """The stream's queues in this process, as both twins: the compiled
    kernel and the pure-Python reference (as the kernel suites run both).
    Patches the engine's SpillQueue (receivers' target queues) and returns
    the class, for the queues a test builds itself."""
    cls = request.param.SpillQueue
    for module in _QUEUE_USERS:
        monkeypatch.setattr(module, "SpillQueue", cls)
    return cls
