"""benchmarks/real_path.py (the GPU real-path run) in its CPU smoke mode: known to work before a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_real_path_smoke(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/real_path.py", str(tmp_path / "out"), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "real_path.json").read_text())
    assert result["steps"] == 2 and result["student"] == "siclip_tiny" and "Apple layout" in result["teacher"]
    assert {"zeroshot/acc1", "retrieval/image_retrieval_recall@1"} <= set(result["eval"])
    assert not any(k.startswith("zeroshot_") for k in result["eval"])  # shards: no embedded-world metrics unless asked
    records = sorted(p.name for p in (tmp_path / "out" / "run" / "eval").glob("*.json"))
    assert records == ["retrieval_zeroshot_retrieval.json", "zeroshot_zeroshot_classification.json"]
