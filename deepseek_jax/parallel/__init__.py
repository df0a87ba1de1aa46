"""Parallelism on JAX's own runtime: a device mesh with one table of logical-axis rules (``mesh.py``), the train
step jitted with NamedSharding in/out shardings, expert parallelism by all-to-all under shard_map
(``expert_parallel.py``), and redundant-expert placement from measured loads (``placement.py``)."""
