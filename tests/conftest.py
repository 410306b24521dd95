"""The suite in three levels, each a directory:

    kernels/      one compiled kernel or its facade, alone (both twins)
    engine/       engine pieces in this one process (loopback sockets, rsync as the oracle)
    integration/  daemons and other smirror processes on 127.0.0.1

Shared helpers are the ``support`` package (tests/support/): pytest puts this
directory on sys.path because it holds this conftest and no __init__.py.
``-m "not slow"`` leaves out the tests marked slow (more than ~5 s).
"""
