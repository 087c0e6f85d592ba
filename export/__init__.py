"""rpiae.export."""
