"""One job a command runs: encode, train, evaluate, interpret, report.

Each job resolves what it needs from the cache (through :mod:`coopipe.lookup`), calls the library and writes its
outputs into the cache or a run folder. The command line (:mod:`coopipe.cli`) and the DVC stage scripts
(``stages/*.py``) are both thin callers of these functions.
"""
