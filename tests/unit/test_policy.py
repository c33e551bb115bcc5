"""The agent policy (pykata.guest.policy): document validation, each rule
allowing and refusing, the default changing nothing, hostile requests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykata import errors
from pykata.guest.policy import (
    MAX_DOCUMENT,
    ContainerInfo,
    PermissionDenied,
    Policy,
    agent_methods,
)
from pykata.protos import agent_pb2 as pb

DIGEST = "sha256:" + "ab" * 32
WEB = ContainerInfo("c1", name="web", image="docker.io/library/nginx:1.25",
                    exec_ids=frozenset({"e1"}))
DB = ContainerInfo("c2", name="db", image="docker.io/library/postgres:16",
                   image_digest=DIGEST)
CONTAINERS = {c.id: c for c in (WEB, DB)}


def policy(**doc: Any) -> Policy:
    return Policy.parse(json.dumps({"version": 1, **doc}))


def exec_req(cid: str, argv: list[str], env: list[str] | None = None) -> pb.ExecProcessRequest:
    proc: dict[str, Any] = {"args": argv, "cwd": "/"}
    if env is not None:
        proc["env"] = env
    return pb.ExecProcessRequest(container_id=cid, exec_id="x",
                                 process_json=json.dumps(proc).encode())


def spec(args: list[str], image: str = "registry.k8s.io/pause:3.9", caps: Sequence[str] = (),
         namespaces: tuple[str, ...] = ("mount", "ipc", "uts", "pid")) -> dict[str, Any]:
    return {
        "annotations": {"io.kubernetes.cri.image-name": image,
                        "io.kubernetes.cri.container-name": "app"},
        "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/",
                    "capabilities": {"bounding": list(caps), "effective": list(caps)}},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": t} for t in namespaces]},
    }


def create_req(s: dict[str, Any], pidns: bool = False) -> pb.CreateContainerRequest:
    return pb.CreateContainerRequest(container_id="c3", oci_spec_json=json.dumps(s).encode(),
                                     sandbox_pidns=pidns)


def denied(p: Policy, method: str, req: Any, rule: str, **kw: Any) -> str:
    with pytest.raises(PermissionDenied) as exc:
        p.check(method, req, CONTAINERS, **kw)
    msg = str(exc.value)
    assert f"{method} denied by rule {rule}" in msg, msg
    assert exc.value.code == 7  # gRPC PERMISSION_DENIED on the wire
    assert "\n" not in msg
    return msg


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "where"), [
    ("[]", "policy: must be an object"),
    ("{}", "policy: version is required"),
    ('{"version": 2}', "version: must be 1"),
    ('{"version": true}', "version: must be 1"),
    ('{"version": 1, "bogus": 1}', "unknown key 'bogus'"),
    ('{"version": 1, "default": "maybe"}', "default: must be one of allow, deny"),
    ('{"version": 1, "default": 1}', "default: must be one of"),
    ('{"version": 1, "methods": {"Nope": "deny"}}', "methods.Nope: AgentService has no such"),
    ('{"version": 1, "methods": {"ExecProcess": true}}', "methods.ExecProcess: must be one"),
    ('{"version": 1, "methods": []}', "methods: must be an object"),
    ('{"version": 1, "exec": {}}', "exec: commands is required"),
    ('{"version": 1, "exec": {"commands": [{"argv": []}]}}', "exec.commands[0].argv: must not"),
    ('{"version": 1, "exec": {"commands": [{"argv": "sh"}]}}', "argv: must be a list"),
    ('{"version": 1, "exec": {"commands": [{"argv": [1]}]}}', "argv[0]: must be a string"),
    ('{"version": 1, "exec": {"commands": [{"argv": ["a"], "match": "glob"}]}}',
     "match: must be one of exact, prefix"),
    ('{"version": 1, "exec": {"commands": [{"argv": ["a"], "env": ["X"]}]}}',
     "env[0]: must be NAME=value"),
    ('{"version": 1, "exec": {"commands": [{"argv": ["a"], "user": 0}]}}', "unknown key 'user'"),
    ('{"version": 1, "exec": {"commands": [{"argv": ["a"], "images": ["a*b"]}]}}',
     "'*' may only end a pattern"),
    ('{"version": 1, "copy_file": {"paths": ["relative"]}}', "not an absolute canonical path"),
    ('{"version": 1, "copy_file": {"paths": ["/a/../etc/"]}}', "not an absolute canonical path"),
    ('{"version": 1, "copy_file": {"paths": ["//etc"]}}', "not an absolute canonical path"),
    ('{"version": 1, "copy_file": {"paths": ["/a/./b"]}}', "not an absolute canonical path"),
    ('{"version": 1, "stdio": "mine"}', "stdio: must be one of any, own-exec-only, none"),
    ('{"version": 1, "create_container": {"images": ["sha256:abc"]}}', "64 lowercase hex"),
    ('{"version": 1, "create_container": {"allow_privileged": "no"}}', "must be true or false"),
    ('{"version": 1, "create_container": {"commands": [{"argv": ["a"], "containers": ["x"]}]}}',
     "unknown key 'containers'"),
    ('{"version": 1, "set_policy": "sometimes"}', "set_policy: must be one of allow, deny"),
    ('{"version": 1, "version": 1}', "duplicate key"),
    ('{"version": 1, "default": NaN}', "NaN is not JSON"),
    ('{"version": 1', "not JSON"),
    (b'\xff\xfe', "not JSON"),
    ('{"version": 1, "methods": {"ExecProcess": "allow\\u0000"}}', "must be one of"),
    ('{"version": 1, "exec": {"commands": [{"argv": ["a\\u0000b"]}]}}', "NUL character"),
    ("[" * 100_000 + "]" * 100_000, "larger"),
    ("[" * 20_000 + "]" * 20_000, "nested too deeply"),
])
def test_invalid_documents_are_refused_with_one_line(doc: str | bytes, where: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        Policy.parse(doc)
    msg = str(exc.value)
    assert msg.startswith("invalid agent policy: ")
    if where == "larger":
        assert f"more than {MAX_DOCUMENT}" in msg
    else:
        assert where in msg, msg
    assert "\n" not in msg


def test_oversized_lists_and_strings_are_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="more than 256 entries"):
        policy(copy_file={"paths": [f"/p{i}" for i in range(257)]})
    with pytest.raises(errors.InvalidArgument, match="longer than 4096"):
        policy(exec={"commands": [{"argv": ["x" * 4097]}]})


def test_a_full_document_parses() -> None:
    p = policy(default="deny", methods={"ExecProcess": "allow", "DebugExec": "deny"},
               exec={"commands": [{"argv": ["ls"], "match": "prefix", "containers": ["web"],
                                   "images": ["docker.io/library/*", DIGEST],
                                   "env": ["PATH=*"]}]},
               copy_file={"paths": ["/run/shared/", "/etc/hosts"]}, stdio="own-exec-only",
               create_container={"images": [DIGEST], "commands": [{"argv": ["/pause"]}],
                                 "allow_privileged": True, "allow_host_namespaces": False},
               set_policy="allow")
    assert not p.default_allow and p.replaceable and p.stdio == "own-exec-only"


def test_method_names_come_from_the_service() -> None:
    assert {"ExecProcess", "CopyFile", "CreateContainer", "ReadStdout"} <= agent_methods()


# -- the default changes nothing ---------------------------------------------------------


def _every_request() -> list[tuple[str, Any]]:
    out = []
    for name in sorted(agent_methods()):
        svc = pb.DESCRIPTOR.services_by_name["AgentService"]
        cls = getattr(pb, svc.methods_by_name[name].input_type.name)
        out.append((name, cls()))
    return out


@pytest.mark.parametrize("doc", [None, '{"version": 1}'])
def test_default_allows_every_method_and_request(doc: str | None) -> None:
    p = Policy.allow_all() if doc is None else Policy.parse(doc)
    for name, req in _every_request():
        p.check(name, req, CONTAINERS)
    p.check("ExecProcess", exec_req("c1", ["rm", "-rf", "/"]), CONTAINERS)
    p.check("CopyFile", pb.CopyFileRequest(path="/etc/../etc/shadow"), CONTAINERS)
    p.check("ReadStdout", pb.ReadStreamRequest(container_id="c2"), CONTAINERS)
    p.check("CreateContainer", create_req(spec(["sh"], caps=["CAP_SYS_ADMIN"],
                                               namespaces=())), CONTAINERS)


# -- methods and default -----------------------------------------------------------------


def test_default_deny_with_per_method_allow() -> None:
    p = policy(default="deny", methods={"ReadStdout": "allow"})
    p.check("ReadStdout", pb.ReadStreamRequest(container_id="c1", exec_id="e1"), CONTAINERS)
    denied(p, "ExecProcess", exec_req("c1", ["ls"]), "default")


def test_per_method_deny() -> None:
    p = policy(methods={"SetGuestDateTime": "deny"})
    denied(p, "SetGuestDateTime", pb.SetGuestDateTimeRequest(), "methods.SetGuestDateTime")
    p.check("GetMetrics", pb.GetMetricsRequest(), CONTAINERS)


# -- exec --------------------------------------------------------------------------------


def test_exec_exact_and_prefix() -> None:
    p = policy(exec={"commands": [{"argv": ["cat", "/etc/hostname"]},
                                  {"argv": ["ls", "-l"], "match": "prefix"}]})
    p.check("ExecProcess", exec_req("c1", ["cat", "/etc/hostname"]), CONTAINERS)
    p.check("ExecProcess", exec_req("c1", ["ls", "-l", "/tmp"]), CONTAINERS)
    p.check("ExecProcess", exec_req("c1", ["ls", "-l"]), CONTAINERS)
    msg = denied(p, "ExecProcess", exec_req("c1", ["cat", "/etc/hostname", "/etc/shadow"]),
                 "exec.commands")
    assert '["cat", "/etc/hostname", "/etc/shadow"] in container web' in msg
    denied(p, "ExecProcess", exec_req("c1", ["ls"]), "exec.commands")  # shorter than prefix
    denied(p, "ExecProcess", exec_req("c1", ["ls", "-lR"]), "exec.commands")  # items, not chars
    denied(p, "ExecProcess", exec_req("c1", ["sh", "-c", "cat /etc/hostname"]), "exec.commands")


def test_exec_scoped_to_container_name_id_and_image() -> None:
    p = policy(exec={"commands": [
        {"argv": ["nginx", "-s", "reload"], "containers": ["web"]},
        {"argv": ["psql"], "match": "prefix", "images": [DIGEST]},
        {"argv": ["date"], "containers": ["c2"], "images": ["docker.io/library/postgres:*"]},
    ]})
    p.check("ExecProcess", exec_req("c1", ["nginx", "-s", "reload"]), CONTAINERS)
    denied(p, "ExecProcess", exec_req("c2", ["nginx", "-s", "reload"]), "exec.commands")
    p.check("ExecProcess", exec_req("c2", ["psql", "-c", "select 1"]), CONTAINERS)
    # The image name says postgres too, but a digest pattern needs a verified digest.
    denied(p, "ExecProcess", exec_req("c1", ["psql"]), "exec.commands")
    p.check("ExecProcess", exec_req("c2", ["date"]), CONTAINERS)
    denied(p, "ExecProcess", exec_req("c1", ["date"]), "exec.commands")
    # A container the agent does not know matches no scoped rule.
    denied(p, "ExecProcess", exec_req("nope", ["nginx", "-s", "reload"]), "exec.commands")


def test_exec_env_rule() -> None:
    p = policy(exec={"commands": [{"argv": ["id"], "env": ["PATH=*", "TERM=xterm"]}]})
    p.check("ExecProcess", exec_req("c1", ["id"], ["PATH=/usr/bin", "TERM=xterm"]), CONTAINERS)
    p.check("ExecProcess", exec_req("c1", ["id"]), CONTAINERS)
    denied(p, "ExecProcess", exec_req("c1", ["id"], ["LD_PRELOAD=/tmp/x.so"]), "exec.commands")
    denied(p, "ExecProcess", exec_req("c1", ["id"], ["TERM=vt100"]), "exec.commands")
    denied(p, "ExecProcess", exec_req("c1", ["id"], ["PATH"]), "exec.commands")


def test_exec_section_closes_the_debug_console_unless_allowed() -> None:
    p = policy(exec={"commands": [{"argv": ["id"]}]})
    denied(p, "DebugExec", pb.ExecProcessRequest(exec_id="d"), "exec")
    policy(exec={"commands": [{"argv": ["id"]}]}, methods={"DebugExec": "allow"}).check(
        "DebugExec", pb.ExecProcessRequest(exec_id="d"), CONTAINERS)


@pytest.mark.parametrize("process_json", [
    b"", b"not json", b"[]", b'{"args": "id"}', b'{"args": [1]}', b"[" * 50_000,
    b'{"args": ["id"], "env": "PATH=/"}', b'{"args": ["id"], "env": [1]}',
    b"\xff" * 10, b"x" * (1024 * 1024 + 1),
])
def test_exec_hostile_process_json_is_refused(process_json: bytes) -> None:
    p = policy(exec={"commands": [{"argv": ["id"]}]})
    with pytest.raises(errors.PykataError) as exc:
        p.check("ExecProcess", pb.ExecProcessRequest(container_id="c1", exec_id="x",
                                                     process_json=process_json), CONTAINERS)
    assert isinstance(exc.value, PermissionDenied | errors.InvalidArgument)
    assert "\n" not in str(exc.value)


def test_a_dict_request_works_like_the_message() -> None:
    p = policy(exec={"commands": [{"argv": ["id"]}]})
    p.check("ExecProcess", {"container_id": "c1", "process_json": {"args": ["id"]}},
            CONTAINERS)
    denied(p, "ExecProcess", {"container_id": "c1", "process_json": b'{"args": ["sh"]}'},
           "exec.commands")
    with pytest.raises(errors.InvalidArgument, match="container_id is not a string"):
        p.check("ExecProcess", {"container_id": 3, "process_json": b"{}"}, CONTAINERS)


# -- copy_file ---------------------------------------------------------------------------


def test_copy_file_paths() -> None:
    p = policy(copy_file={"paths": ["/run/shared/", "/etc/resolv.conf"]})
    for ok in ("/run/shared/a", "/run/shared/d/e/f", "/etc/resolv.conf"):
        p.check("CopyFile", pb.CopyFileRequest(path=ok), CONTAINERS)
    for bad in ("/etc/shadow", "/run/shared", "/run/sharedx/a", "/etc/resolv.conf.d/x"):
        msg = denied(p, "CopyFile", pb.CopyFileRequest(path=bad), "copy_file.paths")
        assert "outside the allowed paths" in msg
    for tricky in ("/run/shared/../../etc/shadow", "/run/shared/./a", "/run/shared//a",
                   "run/shared/a", "//run/shared/a", "/run/shared/a/", "", "/run/shared/.."):
        msg = denied(p, "CopyFile", pb.CopyFileRequest(path=tricky), "copy_file.paths")
        assert "not an absolute canonical path" in msg


def test_copy_file_root_directory_allows_everything_canonical() -> None:
    p = policy(copy_file={"paths": ["/"]})
    p.check("CopyFile", pb.CopyFileRequest(path="/etc/hosts"), CONTAINERS)
    denied(p, "CopyFile", pb.CopyFileRequest(path="/etc/../x"), "copy_file.paths")


# -- stdio -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ReadStdout", "ReadStderr", "WriteStdin", "CloseStdin"])
def test_stdio_own_exec_only(method: str) -> None:
    p = policy(stdio="own-exec-only")
    req = {"container_id": "c1", "exec_id": "e1"}
    p.check(method, req, CONTAINERS)
    msg = denied(p, method, {"container_id": "c1", "exec_id": ""}, "stdio")
    assert "init process of container c1" in msg
    denied(p, method, {"container_id": "c2", "exec_id": "e1"}, "stdio")  # e1 is c1's
    # An unknown container passes to the handler, which answers NotFound.
    p.check(method, {"container_id": "gone", "exec_id": "e1"}, CONTAINERS)
    # The debug console's processes are exec'd too (container id "").
    debug = {"": ContainerInfo("", exec_ids=frozenset({"d1"}))}
    p.check(method, {"container_id": "", "exec_id": "d1"}, debug)


def test_stdio_none_and_other_methods_unaffected() -> None:
    p = policy(stdio="none")
    denied(p, "ReadStdout", pb.ReadStreamRequest(container_id="c1", exec_id="e1"), "stdio")
    p.check("TtyWinResize", pb.TtyWinResizeRequest(container_id="c1"), CONTAINERS)
    p.check("WaitProcess", pb.WaitProcessRequest(container_id="c1"), CONTAINERS)


# -- create_container --------------------------------------------------------------------


def test_create_container_images() -> None:
    p = policy(create_container={"images": ["registry.k8s.io/pause:*", DIGEST]})
    p.check("CreateContainer", create_req(spec(["/pause"])), CONTAINERS)
    msg = denied(p, "CreateContainer", create_req(spec(["sh"], image="evil.example/x:1")),
                 "create_container.images")
    assert "evil.example/x:1" in msg
    # A digest pattern matches only the digest the agent verified (guest pull).
    p.check("CreateContainer", create_req(spec(["sh"], image="any")), CONTAINERS,
            image_digest=DIGEST)
    denied(p, "CreateContainer", create_req(spec(["sh"], image=DIGEST)),
           "create_container.images")
    s = spec(["sh"])
    del s["annotations"]
    assert "(no image name)" in denied(p, "CreateContainer", create_req(s),
                                       "create_container.images")


def test_create_container_commands() -> None:
    p = policy(create_container={"commands": [{"argv": ["/pause"]},
                                              {"argv": ["nginx"], "match": "prefix"}]})
    p.check("CreateContainer", create_req(spec(["/pause"])), CONTAINERS)
    p.check("CreateContainer", create_req(spec(["nginx", "-g", "daemon off;"])), CONTAINERS)
    denied(p, "CreateContainer", create_req(spec(["sh"])), "create_container.commands")


def test_create_container_privileged() -> None:
    p = policy(create_container={})
    p.check("CreateContainer", create_req(spec(["x"], caps=["CAP_CHOWN", "CAP_KILL"])),
            CONTAINERS)
    msg = denied(p, "CreateContainer", create_req(spec(["x"], caps=["CAP_SYS_ADMIN"])),
                 "create_container.allow_privileged")
    assert "CAP_SYS_ADMIN" in msg
    s = spec(["x"])
    s["process"]["capabilities"] = {"ambient": "CAP_SYS_ADMIN"}
    denied(p, "CreateContainer", create_req(s), "create_container.allow_privileged")
    policy(create_container={"allow_privileged": True}).check(
        "CreateContainer", create_req(spec(["x"], caps=["CAP_SYS_ADMIN"])), CONTAINERS)


def test_no_privileged_exec_either() -> None:
    p = policy(create_container={})
    proc = {"args": ["id"], "capabilities": {"effective": ["CAP_SYS_PTRACE"]}}
    msg = denied(p, "ExecProcess", {"container_id": "c1", "process_json": proc},
                 "create_container.allow_privileged")
    assert "effective capabilities include CAP_SYS_PTRACE" in msg
    p.check("ExecProcess", {"container_id": "c1", "process_json": {"args": ["id"]}}, CONTAINERS)
    for bad in ([["CAP_SYS_ADMIN"]], "CAP_SYS_ADMIN", [1]):
        denied(p, "ExecProcess", {"container_id": "c1", "process_json": {
            "args": ["id"], "capabilities": {"bounding": bad}}},
            "create_container.allow_privileged")
    denied(p, "ExecProcess", {"container_id": "c1", "process_json": {
        "args": ["id"], "capabilities": ["CAP_SYS_ADMIN"]}}, "create_container.allow_privileged")
    policy(create_container={"allow_privileged": True}).check(
        "ExecProcess", {"container_id": "c1", "process_json": proc}, CONTAINERS)


def test_create_container_host_namespaces() -> None:
    p = policy(create_container={})
    for missing in ("mount", "ipc", "uts", "pid"):
        kinds = tuple(k for k in ("mount", "ipc", "uts", "pid") if k != missing)
        msg = denied(p, "CreateContainer", create_req(spec(["x"], namespaces=kinds)),
                     "create_container.allow_host_namespaces")
        assert f"no {missing} namespace" in msg
    # The sandbox's pid namespace is the pod's, not the agent's.
    p.check("CreateContainer",
            create_req(spec(["x"], namespaces=("mount", "ipc", "uts")), pidns=True), CONTAINERS)
    policy(create_container={"allow_host_namespaces": True}).check(
        "CreateContainer", create_req(spec(["x"], namespaces=())), CONTAINERS)


def test_create_container_hostile_spec() -> None:
    p = policy(create_container={})
    for bad in (b"", b"[]", b"[" * 50_000, b'{"process": 3}', b'{"linux": {"namespaces": 5}}'):
        with pytest.raises(errors.PykataError) as exc:
            p.check("CreateContainer", pb.CreateContainerRequest(oci_spec_json=bad), CONTAINERS)
        assert isinstance(exc.value, PermissionDenied | errors.InvalidArgument)


# -- set_policy --------------------------------------------------------------------------


def test_set_policy() -> None:
    first = Policy.allow_all().replace('{"version": 1, "default": "deny"}')
    assert not first.default_allow
    with pytest.raises(PermissionDenied, match="SetPolicy denied by rule set_policy"):
        first.replace('{"version": 1}')
    open_ = policy(set_policy="allow")
    assert open_.replace('{"version": 1}').replaceable is False
    with pytest.raises(errors.InvalidArgument):
        open_.replace("{}")


# -- hostile inputs, generated -----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_random_documents_never_crash(data: bytes) -> None:
    try:
        Policy.parse(data)
    except errors.InvalidArgument as exc:
        assert str(exc).startswith("invalid agent policy: ")


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["default", "methods", "exec", "copy_file", "stdio",
                                        "create_container", "set_policy"]), _json))
def test_random_structures_never_crash(doc: dict[str, Any]) -> None:
    try:
        Policy.parse(json.dumps({"version": 1, **doc}))
    except errors.InvalidArgument as exc:
        assert str(exc).startswith("invalid agent policy: ")


STRICT = policy(default="allow", exec={"commands": [{"argv": ["id"], "env": ["A=*"]}]},
                copy_file={"paths": ["/run/"]}, stdio="own-exec-only", create_container={})


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["ExecProcess", "CopyFile", "ReadStdout", "CreateContainer"]),
       st.dictionaries(st.sampled_from(["container_id", "exec_id", "path", "process_json",
                                        "oci_spec_json", "sandbox_pidns"]),
                       _json | st.binary(max_size=50)))
def test_random_requests_are_allowed_or_refused_cleanly(method: str, req: dict[str, Any]
                                                         ) -> None:
    try:
        STRICT.check(method, req, CONTAINERS)
    except (PermissionDenied, errors.InvalidArgument) as exc:
        assert "\n" not in str(exc)


_shaped_spec = st.fixed_dictionaries({}, optional={
    "annotations": _json | st.dictionaries(
        st.sampled_from(["io.kubernetes.cri.image-name", "io.kubernetes.cri.container-name"]),
        _json),
    "process": _json | st.fixed_dictionaries({}, optional={
        "args": _json | st.lists(st.text(max_size=5), max_size=3),
        "env": _json,
        "capabilities": _json | st.dictionaries(st.sampled_from(["bounding", "ambient"]),
                                                _json | st.lists(st.sampled_from(
                                                    ["CAP_SYS_ADMIN", "CAP_KILL"])))}),
    "linux": _json | st.fixed_dictionaries({}, optional={
        "namespaces": _json | st.lists(st.dictionaries(st.just("type"), _json))}),
})


SPECS = policy(create_container={})
SCOPED = policy(exec={"commands": [{"argv": ["id"], "match": "prefix"}]},
                create_container={"images": ["a*"], "commands": [{"argv": ["id"]}]})


@settings(max_examples=300, deadline=None)
@given(_shaped_spec, st.booleans())
def test_random_specs_are_allowed_or_refused_cleanly(spec_doc: dict[str, Any],
                                                     pidns: bool) -> None:
    for p, method, req in (
            (SPECS, "CreateContainer", {"container_id": "n", "oci_spec_json": spec_doc,
                                        "sandbox_pidns": pidns}),
            (SCOPED, "CreateContainer", {"container_id": "n", "oci_spec_json": spec_doc}),
            (SPECS, "ExecProcess", {"container_id": "c1",
                                    "process_json": spec_doc.get("process", spec_doc)})):
        try:
            p.check(method, req, CONTAINERS)
        except (PermissionDenied, errors.InvalidArgument) as exc:
            assert "\n" not in str(exc)
