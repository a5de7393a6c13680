"""The engine core: requests, the block pool, the KV cache manager and the scheduler.

Nothing here imports torch: this is pure bookkeeping, tested on its own.
"""
