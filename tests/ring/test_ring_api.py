"""The ring backend's registration and the errors it raises before any communication."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("dilated_attn_ring")

import dilated_attn_ring.plugin  # noqa: E402
from dilated_attn import dilated_attention  # noqa: E402
from dilated_attn.functional import build_request  # noqa: E402
from dilated_attn.registry import build_registry  # noqa: E402
from dilated_attn_ring import ring_dilated_attention  # noqa: E402


@pytest.fixture
def no_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")


def test_registers_as_distributed_backend_never_chosen_by_auto() -> None:
    registry = build_registry(autoload=False)
    name = registry.register(dilated_attn_ring.plugin, "ring-under-test")
    try:
        backend = registry.attention("ring")
        assert backend.capabilities.distributed and not backend.capabilities.auto
        assert set(backend.capabilities.modes) == {"longnet", "head_groups"}
        q = torch.randn(1, 8, 2, 4, requires_grad=True)
        chosen = registry.select(build_request(q, q, q))
        assert chosen.name != "ring"
    finally:
        registry.unregister(name)
    assert "ring" not in registry.backends()


def test_without_process_group_names_the_group(no_process_group: None) -> None:
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"group=None: no process group is initialised"):
        ring_dilated_attention(q, q, q, [4], [1])


def test_bad_tensors_fail_before_any_communication(no_process_group: None) -> None:
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="rank 4"):
        ring_dilated_attention(q[0], q[0], q[0], [4], [1])
    with pytest.raises(TypeError, match="v.dtype"):
        ring_dilated_attention(q, q, q.double(), [4], [1])
    with pytest.raises(ValueError, match="dilation_rates"):
        ring_dilated_attention(q, q, q, [4], [8])
    with pytest.raises(ValueError, match="mode"):
        ring_dilated_attention(q, q, q, [4], [1], mode="dense")
    with pytest.raises(ValueError, match="scale"):
        ring_dilated_attention(q, q, q, [4], [1], scale=-1.0)


def test_dropout_is_refused_for_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The front door refuses dropout for "ring" (its capabilities declare none) before calling it."""
    registry = build_registry(autoload=False)
    name = registry.register(dilated_attn_ring.plugin, "ring-under-test")
    monkeypatch.setattr("dilated_attn.functional.get_registry", lambda: registry)
    try:
        assert not registry.attention("ring").capabilities.dropout
        q = torch.randn(1, 8, 2, 4)
        with pytest.raises(ValueError, match="dropout_p=0.1"):
            dilated_attention(q, q, q, [4], [1], backend="ring", dropout_p=0.1)
    finally:
        registry.unregister(name)


def test_functional_routes_to_ring_backend(monkeypatch: pytest.MonkeyPatch, no_process_group: None) -> None:
    registry = build_registry(autoload=False)
    name = registry.register(dilated_attn_ring.plugin, "ring-under-test")
    monkeypatch.setattr("dilated_attn.functional.get_registry", lambda: registry)
    try:
        q = torch.randn(1, 8, 2, 4)
        with pytest.raises(ValueError, match="no process group is initialised"):
            dilated_attention(q, q, q, [4], [1], backend="ring")
    finally:
        registry.unregister(name)


@pytest.mark.parametrize("group", ["sp", [0, 1], 0, ("mesh", "sp"), object()])
def test_group_of_another_kind_is_a_type_error(group: object, no_process_group: None) -> None:
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(
        TypeError, match=r"group=.* must be a torch.distributed ProcessGroup, a 1-D DeviceMesh"
    ):
        ring_dilated_attention(q, q, q, [4], [1], group=group)
