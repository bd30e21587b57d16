"""alignprop_core imports and works with ComfyUI absent (imports point nodes -> core only)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, pkgutil, sys
# None in sys.modules makes any import of these names fail, as on a machine without ComfyUI
for name in ("comfy", "comfy_api", "folder_paths", "server", "nodes", "comfy_extras", "execution"):
    sys.modules[name] = None
import alignprop_core
names = [m.name for m in pkgutil.walk_packages(alignprop_core.__path__, "alignprop_core.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_core_module_imports_without_comfyui():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) >= 10


def test_no_core_file_names_a_comfyui_module():
    banned = ("import comfy", "from comfy", "import folder_paths", "from folder_paths",
              "import server", "from server", "comfy_api")
    for path in (ROOT / "alignprop_core").rglob("*.py"):
        text = path.read_text()
        for word in banned:
            assert word not in text, f"{path} mentions {word!r}"
