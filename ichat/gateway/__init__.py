"""The iChat Gateway: one aiohttp app in front of many workers (``python -m ichat.gateway``)."""

from ichat.gateway.app import build_app

__all__ = ["build_app"]
