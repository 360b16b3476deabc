"""The dask client the sweep runs its tasks on, with the worker environment measured to be fast.

Why apart: the allocator setting below is a property of this machine's glibc and dask's nanny, not of the sweep's
plan or of any method; it lives in the one place that starts a cluster.
"""

from __future__ import annotations

import logging
from typing import Any

import dask

# dask's nanny starts every worker with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
# threshold: each large tensor of a training step is then mapped and page-faulted anew. Measured on 2 cores, one
# thread, a CoCoOp step at 101 classes: 366 ms alone, 590 ms with that variable (199 ms of it in the kernel,
# 124,000 minor page faults a step). The sweep's workers keep glibc's default (a variable the user sets wins).
_MALLOC_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


class dask_client:
    """A dask Client on ``scheduler``, or on a LocalCluster of ``n`` single-process workers (closed on exit)."""

    def __init__(self, scheduler: str | None, n: int, threads: int) -> None:
        self.scheduler, self.n, self.threads = scheduler, n, threads
        self.cluster: Any = None
        self.client: Any = None

    def __enter__(self) -> Any:
        from distributed import Client, LocalCluster

        if self.scheduler:
            self.client = Client(self.scheduler)
        else:
            env = {k: str(self.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
            with dask.config.set({_MALLOC_TRIM: None}):  # None unsets it (distributed.nanny._get_env_variables)
                self.cluster = LocalCluster(n_workers=self.n, threads_per_worker=1, processes=True, memory_limit=0,
                                            dashboard_address=":0", env=env, silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
        return self.client

    def __exit__(self, *exc: object) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
