"""deepseek_jax: a JAX/Flax reference implementation of DeepSeek-V3 (arXiv 2412.19437)."""

__version__ = "0.1.0"
