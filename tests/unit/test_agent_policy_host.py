"""Issue 19, the host's half of the agent policy: the documents a sandbox
brings to its agent (runtime/agentpolicy.py: [agent] policy_file, the pod
annotation, [guest_pull] signature_policy_file), what Sandbox.create and the
shim do with them, the shim's stdio relays under a policy that keeps a
process's stdio in the guest, and `pykata policy check`."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, cast

import pytest

from pykata import config, errors
from pykata.cli import admin
from pykata.guest.policy import MAX_DOCUMENT
from pykata.protos import containerd_shim_pb2 as pb
from pykata.runtime import agentpolicy
from pykata.runtime.types import Stdio
from pykata.shim import service as svc
from pykata.shim.stdio import StdioRelay
from pykata.testing import default_spec
from pykata.testing.fakes import FakePublisher, FakeSandbox, FakeSandboxFactory

POLICY = {"version": 1, "exec": {"commands": [{"argv": ["cat", "/etc/hostname"]}]},
          "set_policy": "deny"}
ANN = agentpolicy.POLICY_ANNOTATION


def _doc(obj: Any = None) -> bytes:
    return json.dumps(POLICY if obj is None else obj).encode()


def _cfg(tmp_path: Path, policy: bytes | None = None, annotation: bool = False,
         image_policy: bytes | None = None) -> config.Config:
    cfg = config.Config()
    if policy is not None:
        p = tmp_path / "policy.json"
        p.write_bytes(policy)
        cfg.agent.policy_file = str(p)
    cfg.agent.policy_annotation = annotation
    if image_policy is not None:
        p = tmp_path / "signatures.json"
        p.write_bytes(image_policy)
        cfg.guest_pull.signature_policy_file = str(p)
    return cfg


# -- reading the documents ----------------------------------------------------------


def test_no_document_is_allow_all(tmp_path: Path) -> None:
    cfg = config.Config()
    assert agentpolicy.agent_policy(cfg) == b""
    assert agentpolicy.agent_policy(cfg, {"other": "x"}) == b""
    assert agentpolicy.image_policy(cfg) == b""


def test_the_policy_file_is_read_and_validated(tmp_path: Path) -> None:
    assert agentpolicy.agent_policy(_cfg(tmp_path, _doc())) == _doc()
    with pytest.raises(errors.InvalidArgument) as ei:
        agentpolicy.agent_policy(_cfg(tmp_path, _doc({"version": 1, "stdio": "some"})))
    assert str(ei.value) == (f"{tmp_path}/policy.json: invalid agent policy: stdio: must be"
                             " one of any, own-exec-only, none")
    with pytest.raises(errors.InvalidArgument, match="not JSON"):
        agentpolicy.agent_policy(_cfg(tmp_path, b"{"))


def test_a_policy_file_that_cannot_be_used_is_one_error(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, _doc())
    real = Path(cfg.agent.policy_file)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    cases = {
        str(tmp_path / "missing.json"): "No such file or directory",
        str(link): "a symlink (not followed)",
        str(tmp_path): "not a regular file",
    }
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases[str(fifo)] = "not a regular file"  # and no hang waiting for a writer
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_DOCUMENT + 1))
    cases[str(big)] = f"larger than {MAX_DOCUMENT} bytes"
    for path, words in cases.items():
        cfg.agent.policy_file = path
        with pytest.raises(errors.InvalidArgument) as ei:
            agentpolicy.agent_policy(cfg)
        assert str(ei.value) == f"[agent] policy_file {path}: {words}"


def test_the_annotation_overrides_the_file_only_when_accepted(tmp_path: Path) -> None:
    other = _doc({"version": 1, "stdio": "none"})
    ann = {ANN: base64.b64encode(other).decode()}
    assert agentpolicy.agent_policy(_cfg(tmp_path, _doc(), annotation=True), ann) == other
    assert agentpolicy.agent_policy(_cfg(tmp_path, annotation=True), ann) == other
    # Present on a node that does not accept it: refused, never silently ignored.
    for cfg in (_cfg(tmp_path, _doc()), _cfg(tmp_path)):
        with pytest.raises(errors.InvalidArgument) as ei:
            agentpolicy.agent_policy(cfg, ann)
        assert "policy_annotation = false" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize(("value", "words"), [
    ("not base64!", "is not base64"),
    ("", "is empty"),
    (base64.b64encode(b'{"version": 2}').decode(), "invalid agent policy: version: must be 1"),
    ("A" * (agentpolicy.MAX_ANNOTATION + 1), "is larger than"),
])
def test_a_bad_annotation_is_one_error(tmp_path: Path, value: str, words: str) -> None:
    with pytest.raises(errors.InvalidArgument) as ei:
        agentpolicy.agent_policy(_cfg(tmp_path, annotation=True), {ANN: value})
    assert words in str(ei.value) and ANN in str(ei.value)


def test_the_image_policy_is_checked_by_the_guests_parser(tmp_path: Path) -> None:
    doc = b'{"version": 1, "default": "reject"}'
    assert agentpolicy.image_policy(_cfg(tmp_path, image_policy=doc)) == doc
    for bad, words in ((b"[1]", "invalid image signature policy"),
                       (b"{", "invalid image signature policy"),
                       (b'{"version": 1, "anything": []}', "anything")):
        with pytest.raises(errors.InvalidArgument) as ei:
            agentpolicy.image_policy(_cfg(tmp_path, image_policy=bad))
        msg = str(ei.value)
        assert msg.startswith(f"[guest_pull] signature_policy_file {tmp_path}/signatures.json: ")
        assert words in msg and "\n" not in msg, msg


# -- Sandbox.create and the shim --------------------------------------------------------


async def test_the_sandbox_gives_its_agent_the_documents(tmp_path: Path) -> None:
    sig = b'{"version": 1, "default": "reject"}'
    sb = await FakeSandbox.running(state_dir=tmp_path / "state",
                                   config=_cfg(tmp_path, _doc(), image_policy=sig))
    try:
        assert sb.fake_agent.sandbox["policy"] == _doc()
        assert sb.fake_agent.sandbox["image_policy"] == sig
    finally:
        await sb.stop()
    sb = await FakeSandbox.running(state_dir=tmp_path / "state")
    try:
        assert sb.fake_agent.sandbox["policy"] == b""  # the default: allow all, as before
        assert sb.fake_agent.sandbox["image_policy"] == b""
    finally:
        await sb.stop()


async def test_a_bad_document_fails_the_create_before_anything_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for cfg in (_cfg(tmp_path, b'{"version": 1, "nope": 1}'),
                _cfg(tmp_path, image_policy=b"[]")):
        with pytest.raises(errors.InvalidArgument):
            await FakeSandbox.running(state_dir=state, config=cfg)
        assert not state.exists() or not any(state.rglob("*")), "nothing left behind"


def _bundle(tmp_path: Path, annotations: dict[str, str]) -> Path:
    spec = default_spec(["sh"])
    spec["annotations"] = copy.deepcopy(annotations)
    b = tmp_path / "bundle"
    (b / "rootfs").mkdir(parents=True, exist_ok=True)
    (b / "config.json").write_text(json.dumps(spec))
    return b


async def test_the_shim_passes_the_pod_annotation(tmp_path: Path) -> None:
    other = _doc({"version": 1, "stdio": "own-exec-only"})
    b = _bundle(tmp_path, {ANN: base64.b64encode(other).decode()})
    make = FakeSandboxFactory(tmp_path / "state")
    service = svc.TaskService("pod1", "k8s.io", _cfg(tmp_path, annotation=True),
                              FakePublisher(), asyncio.Event(), make_sandbox=make)
    await service.Create(pb.CreateTaskRequest(id="pod1", bundle=str(b)))
    try:
        assert make.agent.sandbox["policy"] == other
    finally:
        await service.Delete(pb.DeleteRequest(id="pod1"))
        if service.sandbox is not None:
            await service.sandbox.stop()


async def test_the_shim_refuses_an_annotation_the_node_does_not_accept(
        tmp_path: Path) -> None:
    b = _bundle(tmp_path, {ANN: base64.b64encode(_doc()).decode()})
    make = FakeSandboxFactory(tmp_path / "state")
    service = svc.TaskService("pod1", "k8s.io", _cfg(tmp_path), FakePublisher(),
                              asyncio.Event(), make_sandbox=make)
    with pytest.raises(errors.InvalidArgument, match="policy_annotation = false"):
        await service.Create(pb.CreateTaskRequest(id="pod1", bundle=str(b)))
    assert make.made == [] and service.sandbox is None
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*"))


# -- the shim's stdio relays -------------------------------------------------------------


class DeniedProc:
    """A process whose every stdio call the agent policy refuses."""

    name = "c1/init"

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0

    async def read_stdout(self, size: int) -> bytes:
        self.reads += 1
        raise errors.PermissionDenied("agent policy: ReadStdout denied by rule stdio: no")

    async def read_stderr(self, size: int) -> bytes:
        self.reads += 1
        raise errors.PermissionDenied("agent policy: ReadStderr denied by rule stdio: no")

    async def write_stdin(self, data: bytes) -> int:
        self.writes += 1
        raise errors.PermissionDenied("agent policy: WriteStdin denied by rule stdio: no")

    async def close_stdin(self) -> None:
        raise errors.PermissionDenied("agent policy: CloseStdin denied by rule stdio: no")


async def test_a_refused_stdio_ends_the_relay_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pykata.shim.stdio")
    paths = {n: tmp_path / n for n in ("stdin", "stdout", "stderr")}
    for p in paths.values():
        os.mkfifo(p)
    # containerd's ends: the readers of the outputs, a writer of stdin.
    readers = [os.open(paths[n], os.O_RDONLY | os.O_NONBLOCK) for n in ("stdout", "stderr")]
    keep = os.open(paths["stdin"], os.O_RDWR)
    proc = DeniedProc()
    relay = StdioRelay(cast(Any, proc), Stdio(stdin=str(paths["stdin"]),
                                              stdout=str(paths["stdout"]),
                                              stderr=str(paths["stderr"])))
    relay.start()
    os.write(keep, b"input")
    await asyncio.wait_for(relay.drain(), 10)  # the outputs end: the exit can be final
    for _ in range(100):
        if proc.writes:
            break
        await asyncio.sleep(0.02)
    await relay.close_stdin()  # CloseIO: the refusal is not an error either
    await relay.stop()
    assert proc.reads == 2 and proc.writes == 1
    lines = [r.getMessage() for r in caplog.records if "relayed no further" in r.getMessage()]
    assert sorted(line.split(":")[0] for line in lines) == [
        "input of c1/init relayed no further", "output of c1/init relayed no further",
        "output of c1/init relayed no further"]
    assert all(r.levelno == logging.INFO for r in caplog.records
               if "relayed no further" in r.getMessage())
    for fd in readers:  # the relay's write ends are closed: end of file, no output
        assert os.read(fd, 10) == b""
        os.close(fd)
    os.close(keep)


# -- pykata policy check --------------------------------------------------------------


def test_policy_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.json"
    good.write_bytes(_doc())
    assert admin.main(["policy", "check", str(good)]) == 0
    assert capsys.readouterr().out == "ok\n"
    bad = tmp_path / "bad.json"
    bad.write_bytes(_doc({"version": 1, "methods": {"Nope": "deny"}}))
    assert admin.main(["policy", "check", str(bad)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "invalid agent policy: methods.Nope: AgentService has no such method\n"
    assert admin.main(["policy", "check", str(tmp_path / "none.json")]) == 1
    assert "No such file or directory" in capsys.readouterr().err
