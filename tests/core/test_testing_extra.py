"""``dilated_attn.testing`` declares what it needs: without pytest it fails naming the ``testing`` extra."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from dilated_attn import testing, tolerances

# A meta path finder that refuses pytest, as in an environment where only dilated-attn-core is installed.
WITHOUT = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    for name in list(sys.modules):
        if name.split(".")[0] in {blocked!r}:
            del sys.modules[name]
    """
)


def _run(blocked: set[str], body: str) -> subprocess.CompletedProcess[str]:
    code = WITHOUT.format(blocked=blocked) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("blocked", [{"pytest"}, {"pytest", "_pytest"}, {"_pytest"}])
def test_without_pytest_the_import_names_the_extra(blocked):
    result = _run(
        blocked,
        """
        try:
            import dilated_attn.testing
        except ImportError as exc:
            print("ImportError:", exc)
        else:
            print("imported")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ImportError:"), result.stdout
    assert "pip install 'dilated-attn-core[testing]'" in result.stdout


def test_without_pytest_the_rest_of_core_and_the_tolerances_import():
    result = _run(
        {"pytest", "_pytest"},
        """
        import torch
        import dilated_attn
        from dilated_attn.tolerances import relative_error
        print(relative_error(torch.ones(3), torch.ones(3)))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.0"


def test_the_extra_is_declared():
    from importlib.metadata import requires

    declared = [r for r in requires("dilated-attn-core") or [] if "extra == 'testing'" in r.replace('"', "'")]
    assert any(r.startswith("pytest>=8") for r in declared), declared
    assert any(r.startswith("hypothesis>=6.100") for r in declared), declared


def test_one_relative_error_and_one_table():
    assert testing.relative_error is tolerances.relative_error
    assert testing.TOLERANCES is tolerances.TOLERANCES


@pytest.mark.parametrize(
    "actual, expected, error",
    [
        ([1.0, 2.0], [1.0, 2.0], 0.0),
        ([3.0, 4.0], [0.0, 0.0], 5.0),  # a zero reference: the absolute error
        ([1.0, -math.inf], [1.0, -math.inf], 0.0),  # -inf (empty rows' lse) compared exactly
        ([1.0, -math.inf], [1.0, 0.0], math.inf),
        ([1.0, math.inf], [1.0, -math.inf], math.inf),
    ],
)
def test_relative_error_values(actual, expected, error):
    assert tolerances.relative_error(torch.tensor(actual), torch.tensor(expected)) == error


def test_relative_error_nan_fails_every_bound():
    err = tolerances.relative_error(torch.tensor([math.nan, 1.0]), torch.tensor([1.0, 1.0]))
    assert math.isnan(err) and not err <= max(max(b) for b in tolerances.TOLERANCES.values())
