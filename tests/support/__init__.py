"""Helpers the tests share (daemons as processes, trees, workloads, storms,
faults): importable as ``support.*`` because pytest puts tests/ on sys.path
(tests/conftest.py); the scripts in tools/ put it there themselves."""
