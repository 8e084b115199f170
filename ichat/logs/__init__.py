"""Log lines: a bounded ring buffer with ids and subscribers, and its SSE form.

Holds: ``hub`` (LogHub, HubGroup, Subscription), ``sse`` (serving a hub as SSE, and a pure
SSE parser). Shared by the worker (its own logs), the gateway (the collector) and the CLI.
May import: ``ichat.errors`` only.
"""
