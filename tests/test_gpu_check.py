"""benchmarks/gpu_check.sh end to end in its CPU mode (tiny sizes): every part runs and the summary
table holds what the GPU run will report."""

import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gc"
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu", "--models", "condinst"],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    rows = [line.split(" | ") for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
    numerics = [r for r in rows if len(r) == 7 and r[0] == "| condinst" and r[1] in ("yes", "NO")]
    # both sides on the CPU in fp32: the same step twice, so every difference is exactly zero
    assert [r[1:6] for r in numerics] == [["yes", "0.0", "0.0", "0.0 (loss)", "1.0"]], summary
    smoke = [r for r in rows if len(r) == 7 and r[0] == "| condinst" and r[1] in ("iuq", "baseline")]
    assert len(smoke) == 2 and all(r[2] == "yes" for r in smoke), summary  # train, export, iuq eval agree
    overhead = [r for r in rows if len(r) == 6 and r[2].endswith("64 px")]
    assert [(r[0].strip("| "), r[1]) for r in overhead] == [
        (m, a) for m in ("mask2former", "condinst") for a in ("baseline", "iuq M=500", "iuq M=2000")
    ], summary
    assert all(r[4] == "1.0" for r in overhead if r[1] == "baseline")
    kernel = [r for r in rows if r[0] in ("| 20000", "| 50000")]
    assert len(kernel) == 4 and all(r[-1] == "True |" for r in kernel), summary
    assert "parts without results" not in summary
