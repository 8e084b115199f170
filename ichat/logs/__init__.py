"""Log lines: a bounded ring buffer with ids and subscribers, and its SSE form."""
