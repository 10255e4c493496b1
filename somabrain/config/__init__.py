"""Layer 1 (bottom): settings, the error taxonomy and semantic id types. Imports nothing of ours."""
