"""GPU inventory filtering by CUDA_VISIBLE_DEVICES (the mapping the supervisor's gpu_ids rely on)."""

from ichat.worker.gpus import gpu_inventory, select_visible, visible_selector

DEVICES = [{"index": i, "uuid": f"GPU-{i}aaa-{i}"} for i in range(4)]


def test_unset_means_all():
    assert select_visible(DEVICES, visible_selector({})) == DEVICES


def test_indices_in_cuda_order():
    assert [d["index"] for d in select_visible(DEVICES, visible_selector({"CUDA_VISIBLE_DEVICES": "2,0"}))] == [2, 0]


def test_uuid_prefixes_and_stop_at_invalid():
    sel = visible_selector({"CUDA_VISIBLE_DEVICES": "GPU-3aaa,7,1"})
    assert [d["index"] for d in select_visible(DEVICES, sel)] == [3]


def test_empty_string_hides_all():
    assert select_visible(DEVICES, visible_selector({"CUDA_VISIBLE_DEVICES": ""})) == []


def test_no_nvml_or_driver_is_empty_not_an_error():
    assert gpu_inventory({}) == [] or all("uuid" in d for d in gpu_inventory({}))
