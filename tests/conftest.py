"""Shared pytest set-up: markers are skipped automatically, with the reason, where the hardware
or library they need is absent."""

from __future__ import annotations

import pytest
import torch

import genie  # noqa: F401  (registers remote_accelerator)


def _has_dpdk() -> tuple[bool, str]:
    try:
        from genie import _C

        if _C._dpdk_available():
            return True, ""
        return False, _C._dpdk_unavailable_reason() or "genie was built without DPDK"
    except Exception as e:  # noqa: BLE001
        return False, str(e)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    dpdk_ok, why = _has_dpdk()
    no_dpdk = pytest.mark.skip(reason=f"needs DPDK: {why}")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "dpdk" in item.keywords and not dpdk_ok:
            item.add_marker(no_dpdk)


@pytest.fixture(autouse=True)
def _clean_executor():
    """Each test starts and ends on the embedded default executor with nothing pending."""
    yield
    genie.synchronize()
