"""The README's main job, run as a user would."""

import subprocess
import sys



from .conftest import require_services


def test_demo_runs_and_cleans_up(network):
    require_services()
    out = subprocess.run(
        [sys.executable, "-m", "vmnet_broker", "demo"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "vm1 -> vm2 (by name): reply" in out.stdout and "vm2 -> vm1 (by name): reply" in out.stdout
    assert "1 peer(s), 2 interface(s)" in out.stdout and out.stdout.rstrip().endswith("demo ok")
