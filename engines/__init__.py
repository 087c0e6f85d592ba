"""rpiae.engines."""
