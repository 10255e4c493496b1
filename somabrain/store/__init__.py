"""Layer 2: the outbox table, every SQL statement on it, and database sessions."""
