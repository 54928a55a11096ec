"""Side-by-side benchmarks of preftune's trainers against TRL (a benchmark/test dependency only).

``python -m benchmarks`` (``make bench``) runs each trainer, ours and TRL's alternately, in fresh subprocesses
and writes ``benchmarks/results.json``, ``benchmarks/results.png`` and a table; see benchmarks/README.md.
"""
