"""iChat: one Gateway in front of many engine Workers, all speaking OpenAI."""

__version__ = "0.1.0"
