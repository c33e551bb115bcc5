#!/usr/bin/env python3
"""Enforce the import directions of docs/architecture.md ("What may import what").

Each pykata package (or top-level module) may import only the packages listed
for it below; everything else is a layering violation, reported one per line
as ``file:line: a -> b``. The layers that must work with any hypervisor driver
also may not read a driver's own configuration section (``config.qemu``): they
read ``config.vm``. Exit status 1 if there is any. Run by `make lint` and
`make test` (scripts/test.sh); stdlib only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

BASE = {"errors", "wire", "protos", "utils", "config", "__init__"}
# layer -> what it may import besides itself. A key with a dot is one module
# with its own rule (runtime.types: the data types host code shares).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "wire": set(),
    "protos": set(),
    "utils": {"errors"},
    "config": {"errors", "utils"},
    "__init__": set(),
    "ttrpc": BASE,
    "guest": BASE | {"ttrpc", "guest.policy"},  # the agent: never host code
    # The guest's policy documents (stdlib only): the agent policy
    # (guest/policy.py), the image signature policy (guest/imagepolicy.py) and
    # the signature check it uses (guest/cosign.py). The host validates a document
    # with the agent's own parser before it boots a VM.
    "guest.policy": BASE,
    "hypervisor": BASE | {"ttrpc"},
    "resources": BASE | {"hypervisor"},
    "runtime.types": BASE,
    "agent": BASE | {"ttrpc", "runtime.types"},
    "observe": set(),
    "tracing": BASE | {"ttrpc", "observe"},  # host only: the shim's OpenTelemetry
    "runtime": BASE | {"ttrpc", "hypervisor", "resources", "agent", "runtime.types",
                       "observe", "tracing", "guest.policy"},
    "metrics": BASE | {"resources", "agent", "runtime.types"},  # the shim's per-sandbox metrics socket
    "shim": BASE | {"ttrpc", "hypervisor", "resources", "agent", "runtime", "runtime.types",
                    "observe", "tracing", "metrics"},
    "image": BASE | {"guest"},  # reuses the guest's module-dependency parser
    "monitor": BASE | {"ttrpc", "agent", "runtime", "runtime.types", "shim"},
    "cli": BASE | {"ttrpc", "hypervisor", "resources", "agent", "runtime", "runtime.types",
                   "shim", "image", "monitor", "guest.policy"},
    "testing": BASE | {"ttrpc", "hypervisor", "resources", "agent", "runtime",
                       "runtime.types", "shim", "guest", "guest.policy", "image", "monitor"},
}

# Driver packages behind the hypervisor contract: only these layers may import
# them (the runtime and the shim reach a driver through pykata.hypervisor).
PRIVATE: dict[str, set[str]] = {
    "pykata.hypervisor.qemu": {"hypervisor", "cli", "testing"},
}
# A driver's own configuration section (pykata.config.HypervisorConfig): these
# layers read the selected driver's common keys as ``config.vm`` instead.
DRIVER_SECTIONS = {"qemu"}
DRIVER_NEUTRAL = {"runtime", "runtime.types", "shim", "resources", "agent", "monitor"}


POLICY_MODULES = {"policy", "imagepolicy", "cosign"}  # guest modules of layer guest.policy


def layer(module: str) -> str:
    """``pykata.runtime.types`` -> runtime.types, ``pykata.shim.main`` -> shim."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[:2] == ["runtime", "types"]:
        return "runtime.types"
    if parts[:1] == ["guest"] and parts[1:2] and parts[1] in POLICY_MODULES:
        return "guest.policy"
    return parts[0]


def module_of(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or parts
    return ".".join(parts)


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            # "from pykata import errors" and "from pykata.runtime import types"
            # import those modules, not the package.
            for n in names:
                sub = n.rpartition(".")[2]
                if (target == "pykata" and sub in ALLOWED) or layer(n) in ("runtime.types",
                                                                           "guest.policy"):
                    out.append((node.lineno, n))
                else:
                    out.append((node.lineno, target))
    return [(ln, m) for ln, m in out if m == "pykata" or m.startswith("pykata.")]


def driver_sections(path: Path) -> list[tuple[int, str]]:
    """(line, name) of each read of a driver's own section (``x.qemu``)."""
    tree = ast.parse(path.read_text(), str(path))
    return sorted((node.lineno, node.attr) for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and node.attr in DRIVER_SECTIONS)


def violations(src: Path = SRC) -> list[str]:
    found = []
    for path in sorted((src / "pykata").rglob("*.py")):
        module = module_of(path, src)
        mine = layer(module)
        allowed = ALLOWED.get(mine)
        if mine in DRIVER_NEUTRAL:
            found += [f"{path.relative_to(src.parent)}:{lineno}: {mine} reads .{name}"
                      f" (a driver's own settings: read config.vm)"
                      for lineno, name in driver_sections(path)]
        for lineno, target in imports(path, module):
            theirs = layer(target)
            private = [p for p in PRIVATE if target == p or target.startswith(p + ".")]
            if private and mine not in PRIVATE[private[0]]:
                found.append(f"{path.relative_to(src.parent)}:{lineno}: {mine} -> {target}"
                             f" (a driver: use pykata.hypervisor.make_driver)")
                continue
            if theirs == mine:
                continue
            if allowed is None:
                found.append(f"{path.relative_to(src.parent)}:{lineno}: package {mine!r} "
                             "has no rule in scripts/check_imports.py")
                break
            if theirs not in allowed:
                found.append(f"{path.relative_to(src.parent)}:{lineno}: {mine} -> {theirs}"
                             f" ({target})")
    return found


def main() -> int:
    bad = violations()
    for line in bad:
        print(line)
    if bad:
        print(f"{len(bad)} import(s) against the layering (docs/architecture.md)",
              file=sys.stderr)
        return 1
    print("import directions: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
