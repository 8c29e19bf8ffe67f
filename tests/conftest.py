"""Test-wide setup: 8 forced CPU devices, before any JAX computation.

Multi-device code (TSQR over a mesh) is tested on CPU with 8 host devices; a
single-device test simply runs on the first one.
"""
import jax

jax.config.update('jax_num_cpu_devices', 8)
