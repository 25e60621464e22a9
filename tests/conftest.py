"""Shared test setup: float64 JAX (as scipy), and where NIST's reference files live."""

from __future__ import annotations

from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

# CI clones the repository next to a read-only copy of shared/; tests read NIST's files there.
NIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nist"
