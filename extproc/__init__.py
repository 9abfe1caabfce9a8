"""token-budget-router: route LLM requests to a short or long vLLM pool by token budget."""

import os as _os

# The estimator solves 12x12 systems with numpy. Multi-threaded BLAS gains
# nothing at that size, and OpenBLAS's idle threads spin-wait after every
# call, burning a core's worth of CPU between requests. One thread, set
# before numpy is first imported (an operator's own setting wins).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
