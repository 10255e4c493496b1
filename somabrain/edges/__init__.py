"""Layer 4 (top): what people and processes call: the `somabrain` command."""
