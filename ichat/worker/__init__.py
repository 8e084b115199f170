"""The iChat worker: one model, one in-process engine, OpenAI routes over aiohttp."""
