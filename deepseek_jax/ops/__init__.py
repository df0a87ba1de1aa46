"""Custom GEMMs: block-scaled FP8 (fp8.py: quantizers, XLA reference, custom-VJP linear; fp8_pallas.py: the
Pallas kernel with promotion and limited-accumulation emulation)."""
