"""Fixtures for the service tests: a registry of adapters for the tiny model (``AdapterFactory`` in
``service_helpers``: random adapters that change the image strongly, so a routing mistake cannot hide
behind a near-no-op adapter; trained ones come from ``purecc.trainer`` like real concepts)."""

from __future__ import annotations

import pytest

from service_helpers import AdapterFactory


@pytest.fixture(scope="session")
def adapter_factory(tiny_model_dir, tmp_path_factory) -> AdapterFactory:
    return AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapter-staging"))
