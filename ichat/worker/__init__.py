"""The iChat worker: one model, one in-process engine, OpenAI routes over aiohttp.

Holds: ``__main__`` (the process: engine start, heartbeats, shutdown), ``app`` (routes),
``cli`` (flags), ``heartbeat``, ``enginewatch`` (engine health watch), ``logcapture`` (fd-level
capture of the process and its engine's children), ``gpus`` (NVML inventory).
May import: ``ichat.engines`` (the plugin loader and contract), ``ichat.logs``, ``ichat.protocol``,
``ichat.errors``, ``ichat.httperrors``, ``ichat.backoff``; never ``ichat.gateway``.
"""
