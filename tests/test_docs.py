"""The Python snippets of docs/python-api.md run exactly as written."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_standard_flows_run_with_only_the_dataloader_swapped(resnet20_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet20-12fca82f.th").symlink_to(resnet20_weights)
    scripts = [b for b in _blocks() if 'checkpoint="resnet20-12fca82f.th"' in b]
    assert len(scripts) == 2 and "calibration_mode" in scripts[0] and "prepare_pt2e" in scripts[1]
    brevitas: dict = {}
    exec(compile(scripts[0], "python-api.md (Brevitas)", "exec"), brevitas)
    assert brevitas["qmodel"](brevitas["calibration_set"].images[:2]).shape == (2, 10)
    pt2e: dict = {}
    exec(compile(scripts[1], "python-api.md (PT2E)", "exec"), pt2e)
    assert pt2e["converted"](pt2e["example"]).shape[1] == 10
    follow_up = next(b for b in _blocks() if b.startswith("from brevitas_zeroshot.quant import BrevitasConfig"))
    exec(compile(follow_up, "python-api.md (quantize)", "exec"), pt2e)  # the same session, as the page reads
    assert pt2e["report"]["graph"] in ("fx", "layerwise")
