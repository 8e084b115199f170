"""The GPUs this worker may use, read through NVML (``nvidia-ml-py``) when present.

NVML sees every GPU of the host and ignores CUDA_VISIBLE_DEVICES, so the inventory is filtered
by that variable (indices or UUIDs, as CUDA accepts them) to what the engine will really see.
No NVML, no driver, or no GPU: an empty list, never an error.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def visible_selector(env: dict[str, str] | os._Environ) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of entries, or None when unset (all GPUs visible)."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def select_visible(devices: list[dict[str, Any]], selector: list[str] | None) -> list[dict[str, Any]]:
    """Pure: keep, in CUDA's order, the devices the selector names (index or UUID prefix)."""
    if selector is None:
        return devices
    chosen = []
    for entry in selector:
        if entry.isdigit():
            match = [d for d in devices if d["index"] == int(entry)]
        else:
            match = [d for d in devices if d["uuid"].startswith(entry)]
        if not match:
            break  # CUDA stops at the first invalid entry
        chosen.extend(match)
    return chosen


def gpu_inventory(env: dict[str, str] | os._Environ | None = None) -> list[dict[str, Any]]:
    env = os.environ if env is None else env
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no GPU: an empty inventory, not an error
        log.debug("NVML unavailable: %r", exc)
        return []
    devices = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = None
            try:
                utilization = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            except pynvml.NVMLError as exc:  # some devices (MIG slices) do not report it
                log.debug("GPU %d utilization not available: %r", index, exc)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            devices.append(
                {
                    "index": index,
                    "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_used_mib": memory.used // (1024 * 1024),
                    "memory_total_mib": memory.total // (1024 * 1024),
                    "utilization_pct": utilization,
                }
            )
    except Exception as exc:  # a driver failing mid-query: report no GPUs rather than fail the scrape
        log.warning("GPU inventory failed: %r", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %r", exc)
    return select_visible(devices, visible_selector(env))
