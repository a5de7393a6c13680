"""Model implementations, the architecture registry and checkpoint loading."""
