"""What the suite's tests and the benchmarks share: one copy of each test mechanism.

- `support.waits`: waiting on a condition with a generous ceiling (`wait_until`, `until`, `Deadline`),
  never on a fixed sleep.
- `support.process`: a child process whose stderr lines (and JSON log events) a thread collects as they
  come (`Child`), the environment children get (`child_env`), and the one reaper (`reap`).
- `support.pki`: a throwaway certificate authority issuing server and client certificates (`ThrowawayCA`).

Importable as `support` from tests/ and benchmarks/ alike: pytest puts tests/ on sys.path through the
`pythonpath` option of pyproject.toml's [tool.pytest.ini_options] (no module edits sys.path). It is
test code: never part of the wheel, and it imports nothing of ours but the installed `mediaseal`.
"""
