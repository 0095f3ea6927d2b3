"""The README's "Use it in a Hugging Face model" example runs as written and stays within ten lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("dilated_attn_transformers")

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", ROOT / "packages" / "transformers" / "README.md"]


def _example(README: Path) -> str:
    section = README.read_text().split("## Use it in a Hugging Face model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the section holds one Python example"
    return blocks[0]


@pytest.mark.parametrize("README", READMES, ids=["root", "package"])
def test_readme_example_runs(README: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _example(README)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.strip() == "torch.Size([2, 48])"
