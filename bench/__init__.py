"""rpiae.bench."""
