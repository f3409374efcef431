"""bench/writer_overlap.py runs end to end at a toy size and prints what its docstring promises:
both rows per coding, the (o)/(s) ratio and verdict lines, and equal caches. No timing is checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def test_writer_overlap_prints_both_rows_the_ratio_and_equal_caches():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "writer_overlap.py"), "--tokens", "3000",
                           "--vocab", "4096", "--k", "8", "--shard-size", "25", "--teacher-us", "20", "--repeats", "1"],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"3,000 answer tokens \(\d+ samples .*\), 4 shards of", out), out[-2000:]
    for coding in ("u8", "bf16"):
        for row in ("(s) sequential", "(o) overlapped"):
            assert re.search(rf"^{coding}\s+{re.escape(row)}\s+{NUMBER}\s+{NUMBER}", out, re.M), (coding, row)
        m = re.search(rf"{coding}: \(o\)/\(s\) kd critical path = {NUMBER} \(paired median\); \(o\) {NUMBER} us/token "
                      rf".*target <= 2 us/token: (PASS|MISS)", out)
        assert m and float(m.group(1)) > 0, out[-2000:]
        assert f"{coding}: same cache bytes (o) == (s): True" in out
