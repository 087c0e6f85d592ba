"""rpiae.cli."""
