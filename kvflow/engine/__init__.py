"""The engine: request intake, the step loop and output processing (sync and async)."""
