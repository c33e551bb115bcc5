"""deploy/: every Kubernetes document is valid against the Kubernetes OpenAPI
schemas (strict: unknown fields fail), the runtime snippets parse and name
pykata's shim, and the node installer's containerd config edit is idempotent
and reversible. All offline: the schemas ship with ``kubernetes-validate``."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from pykata import config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTALL = DEPLOY / "pykata-deploy" / "install.sh"
BUNDLE = DEPLOY / "pykata-deploy" / "bundle.sh"
RUNTIME_TYPE = "io.containerd.pykata.v2"
CONFIG_PATH = "/opt/pykata/share/defaults/pykata/configuration.toml"
# The oldest Kubernetes whose schemas ship with kubernetes-validate, and the newest.
K8S_VERSIONS = [kubernetes_validate.utils.all_versions()[0],
                kubernetes_validate.utils.latest_version()]


def _documents() -> list[tuple[str, int, dict[str, Any]]]:
    docs = []
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((str(path.relative_to(REPO)), i, doc))
    return docs


DOCS = _documents()


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, _, d in DOCS if d.get("kind") == kind]


def _validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_deploy_has_the_expected_documents() -> None:
    kinds = sorted(d["kind"] for _, _, d in DOCS)
    assert kinds == sorted(["RuntimeClass", "ServiceAccount", "ClusterRole",
                            "ClusterRoleBinding", "DaemonSet", "DaemonSet", "Pod",
                            "RuntimeClass", "Pod"]), kinds  # the last two: guest-pull/


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("path", "index", "doc"), DOCS,
                         ids=[f"{p}#{i}:{d.get('kind')}" for p, i, d in DOCS])
def test_document_is_valid_kubernetes(path: str, index: int, doc: dict[str, Any],
                                      version: str) -> None:
    try:
        _validate(doc, version)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{path} document {index} ({doc.get('kind')}) is invalid for "
                    f"Kubernetes {version} at {where or '<root>'}: {e.message}")


@pytest.mark.parametrize(("kind", "mutate"), [
    ("RuntimeClass", lambda d: d.__setitem__("handlr", d.pop("handler"))),
    ("RuntimeClass", lambda d: d.pop("handler")),
    ("RuntimeClass", lambda d: d["overhead"].__setitem__("podFix", {"cpu": "1"})),
    ("DaemonSet", lambda d: d["spec"]["template"]["spec"].__setitem__("hostPid", True)),
    ("DaemonSet", lambda d: d["spec"]["template"]["spec"]["containers"][0]
     .__setitem__("args", "install")),
    ("Pod", lambda d: d["spec"].__setitem__("runtimeClass", "pykata")),
])
def test_validator_catches_mistakes(kind: str, mutate: Any) -> None:
    """The check above can fail: a misspelled or mistyped field is rejected."""
    bad = copy.deepcopy(_by_kind(kind)[0])
    mutate(bad)
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad, K8S_VERSIONS[-1])


def _install_label() -> tuple[str, str]:
    m = re.search(r"^LABEL=\$\{LABEL:-([^=}]+)=([^}]+)\}", INSTALL.read_text(), re.M)
    assert m, "install.sh has no LABEL default"
    return m.group(1), m.group(2)


def test_runtimeclass() -> None:
    (rc,) = [d for d in _by_kind("RuntimeClass") if d["metadata"]["name"] == "pykata"]
    assert rc["apiVersion"] == "node.k8s.io/v1"
    assert rc["metadata"]["name"] == "pykata" and rc["handler"] == "pykata"
    assert rc["overhead"]["podFixed"] == {"memory": "320Mi", "cpu": "250m"}
    key, value = _install_label()
    assert rc["scheduling"]["nodeSelector"] == {key: value} == {"pykata.io/runtime": "true"}
    (pod,) = [d for d in _by_kind("Pod") if d["metadata"]["name"] == "pykata-example"]
    assert pod["spec"]["runtimeClassName"] == rc["metadata"]["name"]


def test_daemonset_installs_with_what_it_needs() -> None:
    (ds,) = [d for d in _by_kind("DaemonSet") if d["metadata"]["name"] == "pykata-deploy"]
    (sa,) = _by_kind("ServiceAccount")
    (role,) = _by_kind("ClusterRole")
    (binding,) = _by_kind("ClusterRoleBinding")
    assert ds["metadata"]["namespace"] == sa["metadata"]["namespace"] == "kube-system"
    spec = ds["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "kube-system"}]
    node_rules = [r for r in role["rules"] if "nodes" in r["resources"]]
    assert node_rules and {"get", "patch"} <= set(node_rules[0]["verbs"])
    assert spec["hostPID"] is True
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["lifecycle"]["preStop"]["exec"]["command"][-1] == "uninstall"
    assert c["args"][0] == "install"
    vols = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    mounts = {vols[m["name"]]: m["mountPath"] for m in c["volumeMounts"]}
    for host in ("/etc/containerd", "/opt/pykata", "/var/lib/pykata", "/run",
                 "/usr/local/bin"):
        assert mounts.get(host) == host, f"{host} must be mounted at the same path"
    # The image puts the installer where the host's /usr/local/bin does not hide it.
    dockerfile = (DEPLOY / "pykata-deploy" / "Dockerfile").read_text()
    assert f"COPY deploy/pykata-deploy/install.sh {c['command'][0]}" in dockerfile


def test_dockerfile_copies_files_that_exist() -> None:
    text = (DEPLOY / "pykata-deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{DEBIAN_IMAGE\}", text, re.M)
    assert "ARG DEBIAN_IMAGE=debian:bookworm" in text
    assert "qemu-system-x86" in text
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies a missing {src}"


def test_containerd_snippets() -> None:
    for name, plugin in (("pykata.toml", "io.containerd.grpc.v1.cri"),
                         ("pykata-v2.toml", "io.containerd.cri.v1.runtime")):
        data = tomllib.loads((DEPLOY / "containerd" / name).read_text())
        assert list(data["plugins"]) == [plugin], name
        rt = data["plugins"][plugin]["containerd"]["runtimes"]["pykata"]
        assert rt["runtime_type"] == RUNTIME_TYPE
        assert rt["privileged_without_host_devices"] is True
        assert rt["options"] == {"ConfigPath": CONFIG_PATH}


def test_crio_dropin() -> None:
    data = tomllib.loads((DEPLOY / "crio" / "50-pykata.conf").read_text())
    rt = data["crio"]["runtime"]["runtimes"]["pykata"]
    assert rt["runtime_path"] == "/usr/local/bin/containerd-shim-pykata-v2"
    assert rt["runtime_type"] == "vm"
    assert rt["runtime_root"] == "/run/pykata"
    assert rt["privileged_without_host_devices"] is True


def test_bundled_configuration_is_valid(tmp_path: Path) -> None:
    text = (DEPLOY / "pykata-deploy" / "configuration.toml").read_text()
    cfg_file = tmp_path / "configuration.toml"
    cfg_file.write_text(text.replace("@PREFIX@", "/opt/pykata"))
    cfg = config.load(cfg_file)
    assert cfg.qemu.path == "/opt/pykata/qemu/bin/qemu-system-x86_64"
    assert cfg.qemu.virtio_fs_daemon == "/opt/pykata/libexec/virtiofsd"
    assert cfg.image.output_dir == "/var/lib/pykata"


@pytest.mark.parametrize("script", [INSTALL, BUNDLE], ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.access(script, os.X_OK) or script.read_text().startswith("#!/usr/bin/env bash")


def _install(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CONTAINERD_CONFIG": str(cfg),
           "ARTIFACTS": "/nonexistent", "RESTART_CONTAINERD": "none"}
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                          env=env, timeout=60)


V2_CONFIG = """version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""


def test_install_configures_containerd_idempotently(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(V2_CONFIG)
    for _ in range(2):
        r = _install(cfg, "configure")
        assert r.returncode == 0, r.stderr
    text = cfg.read_text()
    assert text.startswith(V2_CONFIG)
    assert text.count("# BEGIN pykata-deploy") == 1 and text.count("# END pykata-deploy") == 1
    cri = tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "registry.k8s.io/pause:3.9"
    assert cri["containerd"]["runtimes"]["runc"]["runtime_type"] == "io.containerd.runc.v2"
    rt = cri["containerd"]["runtimes"]["pykata"]
    assert rt["runtime_type"] == RUNTIME_TYPE and rt["options"]["ConfigPath"] == CONFIG_PATH
    if shutil.which("containerd"):
        # containerd itself reads the result (config dump loads, merges, prints).
        dump = subprocess.run(["containerd", "--config", str(cfg), "config", "dump"],
                              capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        dumped = tomllib.loads(dump.stdout)["plugins"]["io.containerd.grpc.v1.cri"]
        drt = dumped["containerd"]["runtimes"]["pykata"]
        assert drt["runtime_type"] == RUNTIME_TYPE
        assert drt["options"]["ConfigPath"] == CONFIG_PATH
    r = _install(cfg, "unconfigure")
    assert r.returncode == 0, r.stderr
    assert cfg.read_text() == V2_CONFIG
    assert _install(cfg, "unconfigure").returncode == 0  # nothing to do: fine
    assert cfg.read_text() == V2_CONFIG


def test_install_picks_the_snippet_by_config_version(tmp_path: Path) -> None:
    v3 = tmp_path / "v3.toml"
    v3.write_text('version = 3\n[plugins."io.containerd.cri.v1.images"]\n  snapshotter = "x"\n')
    assert _install(v3, "configure").returncode == 0
    data = tomllib.loads(v3.read_text())
    assert (data["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
            ["pykata"]["runtime_type"]) == RUNTIME_TYPE
    missing = tmp_path / "new" / "config.toml"
    assert _install(missing, "configure").returncode == 0
    data = tomllib.loads(missing.read_text())
    assert data["version"] == 2 and "io.containerd.grpc.v1.cri" in data["plugins"]
    assert _install(missing, "unconfigure").returncode == 0
    assert not missing.exists()  # it created the file: uninstall removes it


@pytest.mark.parametrize("text", [
    '[plugins.cri]\n  sandbox_image = "x"\n',  # version 1
    V2_CONFIG + '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pykata]\n'
    '  runtime_type = "io.containerd.pykata.v2"\n',  # defined by hand already
], ids=["version-1", "hand-written-pykata"])
def test_install_refuses_configs_it_cannot_edit(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    r = _install(cfg, "configure")
    assert r.returncode != 0 and "error" in r.stderr
    assert cfg.read_text() == text
    assert not list(tmp_path.glob("config.toml.pykata.*"))
