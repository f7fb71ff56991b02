"""The peerbench plan is self-contained: its shipped source runs where `workload` cannot be imported.

The node's bwrap sandbox binds Python, the venv and fedsilo only (not PYTHONPATH), so a plan that says
`import workload` failed every sandboxed benchmark round. The built plan carries workload.py's text; here its
shipped source is loaded, as the worker loads it, in a process where no `workload` module exists, and its model
must equal the workload's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = REPO.parent / "shared" / "bench"

BUILD = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from federation import load_workload, plan_class
from fedsilo.common.plan_source import plan_source
W = load_workload(__import__("pathlib").Path(sys.argv[2]))
cls = plan_class(W, __import__("pathlib").Path(sys.argv[3]))
model = W.build_model("small")
print(json.dumps({"source": plan_source(cls), "digest": [hashlib.sha256(t.detach().numpy().tobytes()).hexdigest()
                                                          for t in model.state_dict().values()]}))
"""

LOAD = r"""
import hashlib, json, sys
from fedsilo.common.plan_source import load_plan_class
source = sys.stdin.read()
try:
    import workload
    print(json.dumps({"error": "workload importable here: the test proves nothing"}))
    raise SystemExit(0)
except ImportError:
    pass
cls = load_plan_class(source, "PeerbenchPlan")
model = cls.workload().build_model("small")
print(json.dumps({"digest": [hashlib.sha256(t.detach().numpy().tobytes()).hexdigest()
                             for t in model.state_dict().values()]}))
"""


@pytest.mark.skipif(not (WORKLOAD / "workload.py").is_file(), reason="../shared/bench/workload.py not present")
def test_shipped_plan_runs_without_the_workload_module(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-c", BUILD, str(REPO / "bench"), str(WORKLOAD), str(tmp_path)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert built.returncode == 0, built.stderr
    out = json.loads(built.stdout.strip().splitlines()[-1])
    assert "import workload" not in out["source"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: as in the sandbox
    loaded = subprocess.run([sys.executable, "-c", LOAD], input=out["source"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {"digest": out["digest"]}
