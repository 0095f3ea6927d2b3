from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("dilated_attn_bench")

from dilated_attn import hookimpl  # noqa: E402
from dilated_attn.registry import get_registry  # noqa: E402

Backends = dict[str, tuple[Callable[..., Any], dict[str, Any]]]


@pytest.fixture
def register_plugin() -> Iterator[Callable[..., None]]:
    """``register_plugin(name, backends={name: (fn, caps)}, pools={name: factory})``: an in-test
    plugin, unregistered when the test ends however it ends."""
    registry = get_registry()
    handles: list[str] = []

    def add(
        name: str, backends: Backends | None = None, pools: dict[str, Callable[..., Any]] | None = None
    ) -> None:
        class Plugin:
            @hookimpl
            def dilated_attn_register_attention(self, register):
                for backend, (fn, caps) in (backends or {}).items():
                    register(backend, fn, **caps)

            @hookimpl
            def dilated_attn_register_pool(self, register):
                for pool, factory in (pools or {}).items():
                    register(pool, factory)

        handles.append(registry.register(Plugin(), name=name))

    try:
        yield add
    finally:
        for handle in handles:
            registry.unregister(handle)


@pytest.fixture
def usage_error(capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """``usage_error(argv, *needles)``: ``main(argv)`` ends as argparse does on a bad argument (exit
    status 2, stderr one line ``dilated-attn-bench <command>: error: ...``, holding every
    needle, and no traceback); returns that line."""
    from dilated_attn_bench.cli import main

    def check(argv: list[str], *needles: str) -> str:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, info.value
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err  # one line, no usage block
        last = lines[0]
        assert last.startswith(f"dilated-attn-bench {argv[0]}: error: "), last
        for needle in needles:
            assert needle in last, (needle, last)
        return last

    return check
