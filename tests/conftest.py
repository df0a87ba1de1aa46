import os

# Tests run on CPU in fp32; keep XLA from grabbing every core of a 2-core CI box per xdist worker.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
