"""The ``ichat`` command: the two servers, and an operator's view of a running gateway.

    ichat gateway ... / ichat worker ...        the servers (``python -m ichat.gateway`` / ``.worker``)
    ichat status | workers | models [--json]    tables built from the admin API
    ichat logs [WORKER] [-f] [--tail N]         worker logs over SSE, resumed after a dropped link
    ichat launch | stop WORKER | reload         admin actions
    ichat chat MODEL [PROMPT]                   a streamed answer, or a conversation

Everything but the servers is a client of the gateway's HTTP API (``ichat.cli.client``): the
admin API is the one source of truth. ``views`` turns its answers into tables (pure).

Holds: ``main`` (subcommands), ``client`` (admin API client), ``views``, ``logs``, ``chat``.
May import: ``ichat.errors``, ``ichat.logs`` (the SSE parser), and ``ichat.gateway.__main__`` /
``ichat.worker.__main__`` only to run those servers; everything else goes over HTTP.
"""
