"""The import directions of docs/architecture.md hold (scripts/check_imports.py),
and the checker catches a violation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_imports",
                                                  ROOT / "scripts/check_imports.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_violations_are_found(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel, text in {
        "pykata/__init__.py": "",
        "pykata/guest/__init__.py": "",
        "pykata/guest/bad.py": "from pykata.runtime.sandbox import Sandbox\n",
        "pykata/utils/__init__.py": "",
        "pykata/utils/ok.py": "from pykata import errors\nfrom . import ok\n",
        "pykata/runtime/__init__.py": "",
        "pykata/runtime/types.py": "from pykata.runtime import sandbox\n",
        "pykata/cli/__init__.py": "",
        "pykata/cli/x.py": "import pykata.testing\n",
        "pykata/newpkg/__init__.py": "import pykata.errors\n",
        "pykata/runtime/boots.py": "from pykata.hypervisor.qemu.driver import QemuHypervisor\n",
        "pykata/runtime/ok.py": "from pykata.hypervisor import make_driver\n",
        "pykata/runtime/sizes.py": "def f(cfg):\n    return cfg.vm.path, cfg.qemu.path\n",
        "pykata/shim/__init__.py": "",
        "pykata/shim/sizes.py": "x = 1\n\ndef f(c):\n    return c.config.hypervisor.qemu\n",
        "pykata/cli/check.py": "def f(cfg):\n    return cfg.qemu.path\n",
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    mod = checker()
    found = "\n".join(mod.violations(src))
    assert "guest -> runtime" in found
    assert "runtime.types -> runtime" in found
    assert "cli -> testing" in found
    assert "'newpkg' has no rule" in found
    assert "runtime -> pykata.hypervisor.qemu.driver (a driver" in found
    assert "runtime/ok.py" not in found
    assert "runtime/sizes.py:2: runtime reads .qemu (a driver's own settings" in found
    assert "shim/sizes.py:4: shim reads .qemu" in found
    assert "cli/check.py" not in found  # pykata check is QEMU's
    assert "utils" not in found


def test_tree_follows_the_layering() -> None:
    assert checker().violations() == []
