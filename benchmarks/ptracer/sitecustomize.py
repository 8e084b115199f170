"""Put on PYTHONPATH of processes that py-spy must read (``routing_quality.py --profile``).

Under Yama's ``ptrace_scope=1`` only an ancestor may attach to a process, and py-spy is the
benchmark's child, a sibling of the workers. ``PR_SET_PTRACER_ANY`` lets any process of the
same user attach to this one; every Python process started with this path (a worker and its
spawned engine core) runs it at start. No other effect."""

import ctypes

try:
    ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)  # PR_SET_PTRACER, PR_SET_PTRACER_ANY
except (OSError, AttributeError):
    pass
