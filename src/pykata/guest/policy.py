"""The agent policy: a JSON document fixed at sandbox creation that decides
each AgentService request (issue 19, docs/confidential.md). The agent's rpc
decorator (guest/service.py) calls :meth:`Policy.check` for every request but
CreateSandbox (which brings the document), SetPolicy (:meth:`Policy.replace`)
and CreateContainer (decided in guest/sandbox.py once the image digest is
known); the host validates a document with :meth:`Policy.parse` before it
boots a VM (runtime/agentpolicy.py, `pykata policy check`).

Rego (Kata's choice) needs OPA, which the guest image does not have; this is a
small declarative format with one evaluator in the stdlib. The format (every
key optional except ``version``; an unknown key, a wrong type or an oversized
value makes the whole document invalid, with one line naming the place)::

    {
      "version": 1,
      "default": "allow",                  # or "deny": methods not listed below
      "methods": {"DebugExec": "deny"},    # per-method allow|deny (AgentService names)
      "exec": {                            # ExecProcess: only these commands
        "commands": [
          {"argv": ["cat", "/etc/hostname"]},                       # exact argv
          {"argv": ["/bin/ls"], "match": "prefix",                  # argv starts so
           "containers": ["web"], "images": ["docker.io/library/nginx:*"],
           "env": ["PATH=*", "TERM=xterm"]}                         # env allowed
        ]
      },
      "copy_file": {"paths": ["/run/pykata/shared/", "/etc/resolv.conf"]},
      "stdio": "any",                      # or "own-exec-only" or "none"
      "create_container": {
        "images": ["registry.k8s.io/pause:*", "sha256:<64 hex>"],
        "commands": [{"argv": ["/pause"]}],
        "allow_privileged": false,
        "allow_host_namespaces": false
      },
      "set_policy": "deny"                 # or "allow": may the host replace it later
    }

Evaluation of one request, in order (the first rule that refuses wins, and the
error names it):

1. ``methods[<Method>]`` if present, else ``default``: may the method be called
   at all. A method name that AgentService does not have is an error in the
   document, not a silent no-op.
2. The method's own section, when present: ``exec`` for ExecProcess (and
   DebugExec, which runs outside every container: with an ``exec`` section it
   is refused unless ``methods.DebugExec`` is "allow" explicitly); ``copy_file``
   for CopyFile; ``stdio`` for ReadStdout, ReadStderr, WriteStdin and
   CloseStdin; ``create_container`` for CreateContainer.

Matching:

* argv rules: ``match`` "exact" (default) compares the whole argv; "prefix"
  requires argv to start with the listed items (whole items, not characters).
  ``containers`` (names or ids) and ``images`` narrow where the rule applies;
  ``env``, when present, lists the only environment entries allowed
  ("NAME=value" exactly, or "NAME=*" for any value of NAME); without it any
  environment passes (LD_PRELOAD included: list env in a strict policy).
* image patterns: "sha256:<hex>" matches only a digest the agent verified
  itself (``ContainerInfo.image_digest``: set by the guest pull, empty until
  it exists); any other pattern is a name, exact or, ending with "*", a prefix.
  The name comes from the spec's ``io.kubernetes.cri.image-name`` annotation,
  which the host writes: until the guest pulls images itself, an image name
  rule only holds against a host that follows the protocol.
* copy_file paths are decided lexically: the request's path must be absolute
  and already canonical (no "." or ".." component, no "//", no trailing "/");
  an entry ending with "/" allows the files below that directory, any other
  entry that one file. The lexical decision is sound because the agent
  writes without following a symlink in any component
  (guestops.copy_file: O_NOFOLLOW|O_DIRECTORY on each openat from /).
* stdio "own-exec-only": only processes started through ExecProcess (or the
  debug console's DebugExec), never a container's init process (exec id
  ""); "none": no stdio at all.
* create_container, when present: ``allow_privileged`` false refuses a
  process with a capability from :data:`PRIVILEGED_CAPS` in any set, for
  the container's process and for every ExecProcess in the sandbox;
  ``allow_host_namespaces`` false refuses a spec without its own mount, ipc,
  uts and pid namespace (pid may instead be the sandbox's: the request's
  ``sandbox_pidns``), which in the guest would share the agent's.

``set_policy``: the agent starts with :meth:`Policy.allow_all`, which may be
replaced once (by the document given at sandbox creation); a parsed document
may be replaced only if it says ``"set_policy": "allow"``.

A refusal raises :class:`pykata.errors.PermissionDenied` (gRPC PERMISSION_DENIED, 7).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pykata import errors

VERSION = 1
MAX_DOCUMENT = 64 * 1024  # bytes of JSON
MAX_ITEMS = 256  # entries in any list or map
MAX_STRING = 4096  # characters in any string
MAX_REQUEST_JSON = 1024 * 1024  # process_json / oci_spec_json examined

IMAGE_NAME_ANNOTATION = "io.kubernetes.cri.image-name"
CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"

# Capabilities that make a container able to leave its confinement or reach the
# agent (mount, modules, raw devices, ptrace, BPF, MAC bypass, reading any file).
PRIVILEGED_CAPS = frozenset({
    "CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_PTRACE", "CAP_SYS_BOOT",
    "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE", "CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH",
    "CAP_SYS_TIME", "CAP_SYSLOG",
})
_CAP_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")
_OWN_NAMESPACES = ("mount", "ipc", "uts", "pid")

STDIO_METHODS = frozenset({"ReadStdout", "ReadStderr", "WriteStdin", "CloseStdin"})
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def agent_methods() -> frozenset[str]:
    """The AgentService method names, from the service's descriptor."""
    from pykata import wire
    from pykata.protos import agent_pb2

    svc = agent_pb2.DESCRIPTOR.services_by_name[wire.AGENT_SERVICE.rsplit(".", 1)[-1]]
    return frozenset(m.name for m in svc.methods)


PermissionDenied = errors.PermissionDenied  # a refusal (gRPC PERMISSION_DENIED, 7)


def _invalid(where: str, reason: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"invalid agent policy: {where}: {reason}")


@dataclass(frozen=True)
class ContainerInfo:
    """What the agent knows of one container, for the policy.

    ``name``: the CRI container name annotation (or ""); ``image``: the image
    name annotation (host-supplied); ``image_digest``: a manifest digest the
    agent verified itself (guest pull), else ""; ``exec_ids``: the processes
    the host started in it through ExecProcess."""

    id: str
    name: str = ""
    image: str = ""
    image_digest: str = ""
    exec_ids: frozenset[str] = frozenset()

    @classmethod
    def from_spec(cls, container_id: str, spec: Mapping[str, Any],
                  image_digest: str = "", exec_ids: Iterable[str] = ()) -> ContainerInfo:
        ann = spec.get("annotations")
        ann = ann if isinstance(ann, dict) else {}
        name = ann.get(CONTAINER_NAME_ANNOTATION, "")
        image = ann.get(IMAGE_NAME_ANNOTATION, "")
        return cls(container_id, name if isinstance(name, str) else "",
                   image if isinstance(image, str) else "", image_digest, frozenset(exec_ids))


@dataclass(frozen=True)
class CommandRule:
    argv: tuple[str, ...]
    prefix: bool = False
    containers: tuple[str, ...] | None = None
    images: tuple[str, ...] | None = None
    env: tuple[str, ...] | None = None

    def describe(self) -> str:
        return f"{'prefix' if self.prefix else 'exact'} {json.dumps(list(self.argv))}"


@dataclass(frozen=True)
class CreateRules:
    images: tuple[str, ...] | None = None
    commands: tuple[CommandRule, ...] | None = None
    allow_privileged: bool = False
    allow_host_namespaces: bool = False


@dataclass(frozen=True)
class Policy:
    default_allow: bool = True
    methods: Mapping[str, bool] = field(default_factory=dict)
    exec_commands: tuple[CommandRule, ...] | None = None
    copy_paths: tuple[str, ...] | None = None
    stdio: str = "any"
    create: CreateRules | None = None
    replaceable: bool = False
    source: str = "allow-all (built in)"

    # -- construction ---------------------------------------------------------

    @classmethod
    def allow_all(cls) -> Policy:
        """The default: everything allowed, replaceable once (as today)."""
        return cls(replaceable=True)

    @classmethod
    def parse(cls, data: bytes | str) -> Policy:
        """A validated policy, or InvalidArgument with one line."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if len(raw) > MAX_DOCUMENT:
            raise _invalid("document", f"{len(raw)} bytes, more than {MAX_DOCUMENT}")
        try:
            doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                             parse_constant=_no_constant)
        except RecursionError:
            raise _invalid("document", "nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _invalid("document", f"not JSON ({exc})") from None
        return cls._from_doc(doc)

    @classmethod
    def _from_doc(cls, doc: Any) -> Policy:
        _keys(doc, "policy", {"version", "default", "methods", "exec", "copy_file", "stdio",
                              "create_container", "set_policy"}, required={"version"})
        if type(doc["version"]) is not int or doc["version"] != VERSION:
            raise _invalid("version", f"must be {VERSION}")
        default = _choice(doc, "default", "default", ("allow", "deny"), "allow")
        methods: dict[str, bool] = {}
        if "methods" in doc:
            known = agent_methods()
            m = _keys(doc["methods"], "methods", None)
            for name in m:
                if name not in known:
                    raise _invalid(f"methods.{_short(name)}", "AgentService has no such method")
                methods[name] = _choice(m, name, f"methods.{name}", ("allow", "deny")) == "allow"
        exec_commands = None
        if "exec" in doc:
            e = _keys(doc["exec"], "exec", {"commands"}, required={"commands"})
            exec_commands = _commands(e["commands"], "exec.commands", scoped=True)
        copy_paths = None
        if "copy_file" in doc:
            c = _keys(doc["copy_file"], "copy_file", {"paths"}, required={"paths"})
            copy_paths = tuple(_policy_path(p, f"copy_file.paths[{i}]")
                               for i, p in enumerate(_list(c["paths"], "copy_file.paths")))
        stdio = _choice(doc, "stdio", "stdio", ("any", "own-exec-only", "none"), "any")
        create = None
        if "create_container" in doc:
            where = "create_container"
            cc = _keys(doc[where], where, {"images", "commands", "allow_privileged",
                                           "allow_host_namespaces"})
            images = None
            if "images" in cc:
                images = tuple(_image_pattern(p, f"{where}.images[{i}]")
                               for i, p in enumerate(_list(cc["images"], f"{where}.images")))
            commands = None
            if "commands" in cc:
                commands = _commands(cc["commands"], f"{where}.commands", scoped=False)
            create = CreateRules(images, commands, _bool(cc, "allow_privileged", where),
                                 _bool(cc, "allow_host_namespaces", where))
        replaceable = _choice(doc, "set_policy", "set_policy", ("allow", "deny"), "deny")
        return cls(default == "allow", methods, exec_commands, copy_paths, stdio, create,
                   replaceable == "allow", source="document")

    def replace(self, data: bytes | str) -> Policy:
        """The policy after a request to replace this one (SetPolicy, or the
        document given at sandbox creation): PermissionDenied if this one is fixed."""
        if not self.replaceable:
            raise PermissionDenied(
                "agent policy: SetPolicy denied by rule set_policy: the policy in force"
                " cannot be replaced")
        return Policy.parse(data)

    # -- evaluation -----------------------------------------------------------

    def check(self, method: str, request: Any, containers: Mapping[str, ContainerInfo],
              image_digest: str = "") -> None:
        """Refuse ``request`` (a protobuf message or a dict of its fields) to
        ``method`` with PermissionDenied naming the rule; return if allowed.
        ``containers``: what the agent has, by id (the debug console as id "");
        ``image_digest``: for CreateContainer, the manifest digest the agent
        verified for the new container ("" if none)."""
        allowed = self.methods.get(method)
        if allowed is None:
            if not self.default_allow:
                _deny(method, "default", "not allowed by the default (deny)")
        elif not allowed:
            _deny(method, f"methods.{method}", "denied")
        if method == "ExecProcess" and self.create is not None \
                and not self.create.allow_privileged:
            # An exec'd process must not gain what its container could not have.
            proc = _json_object(_get(request, "process_json", object), "process_json")
            _check_caps(method, proc)
        if method == "ExecProcess" and self.exec_commands is not None:
            self._check_exec(request, containers)
        elif method == "DebugExec" and self.exec_commands is not None \
                and self.methods.get("DebugExec") is not True:
            _deny(method, "exec", "the debug console runs outside every container; allow it"
                  " with methods.DebugExec")
        elif method == "CopyFile" and self.copy_paths is not None:
            self._check_copy(_get(request, "path", str))
        elif method in STDIO_METHODS and self.stdio != "any":
            self._check_stdio(method, request, containers)
        elif method == "CreateContainer" and self.create is not None:
            self._check_create(request, image_digest)

    def _check_exec(self, request: Any, containers: Mapping[str, ContainerInfo]) -> None:
        cid = _get(request, "container_id", str)
        proc = _json_object(_get(request, "process_json", object), "process_json")
        argv, env = _argv_env(proc, "ExecProcess")
        info = containers.get(cid, ContainerInfo(cid))
        for rule in self.exec_commands or ():
            if _scope_ok(rule, info) and _command_ok(rule, argv, env):
                return
        _deny("ExecProcess", "exec.commands",
              f"{_short(json.dumps(argv))} in container {_short(info.name or cid)} matches no"
              " allowed command")

    def _check_copy(self, path: str) -> None:
        if not _canonical(path):
            _deny("CopyFile", "copy_file.paths",
                  f"{_short(path)!r} is not an absolute canonical path")
        for allowed in self.copy_paths or ():
            if path == allowed or (allowed.endswith("/") and path.startswith(allowed)):
                return
        _deny("CopyFile", "copy_file.paths", f"{_short(path)} is outside the allowed paths")

    def _check_stdio(self, method: str, request: Any,
                     containers: Mapping[str, ContainerInfo]) -> None:
        if self.stdio == "none":
            _deny(method, "stdio", "no process's stdio may be used (none)")
        cid = _get(request, "container_id", str)
        exec_id = _get(request, "exec_id", str)
        if not exec_id:
            _deny(method, "stdio", f"the init process of container {_short(cid)} is not an"
                  " exec process (own-exec-only)")
        info = containers.get(cid)
        if info is not None and exec_id not in info.exec_ids:
            _deny(method, "stdio", f"{_short(exec_id)} in container {_short(cid)} was not"
                  " started through ExecProcess (own-exec-only)")
        # An unknown container: the handler answers NotFound; nothing to read.

    def _check_create(self, request: Any, image_digest: str) -> None:
        rules = self.create
        assert rules is not None
        spec = _json_object(_get(request, "oci_spec_json", object), "oci_spec_json")
        info = ContainerInfo.from_spec(_get(request, "container_id", str), spec, image_digest)
        where = "create_container"
        if rules.images is not None and not _image_ok(rules.images, info):
            what = info.image_digest or info.image or "(no image name)"
            _deny("CreateContainer", f"{where}.images", f"image {_short(what)} is not allowed")
        proc = spec.get("process")
        if not isinstance(proc, dict):
            _deny("CreateContainer", where, "the spec has no process object")
        if rules.commands is not None:
            argv, env = _argv_env(proc, "CreateContainer")
            if not any(_command_ok(r, argv, env) for r in rules.commands):
                _deny("CreateContainer", f"{where}.commands",
                      f"{_short(json.dumps(argv))} matches no allowed command")
        if not rules.allow_privileged:
            _check_caps("CreateContainer", proc)
        if not rules.allow_host_namespaces:
            linux = spec.get("linux")
            nss = linux.get("namespaces") if isinstance(linux, dict) else None
            kinds = {ns.get("type") for ns in nss
                     if isinstance(ns, dict) and isinstance(ns.get("type"), str)} \
                if isinstance(nss, list) else set()
            if _get(request, "sandbox_pidns", bool):
                kinds.add("pid")
            for kind in _OWN_NAMESPACES:
                if kind not in kinds:
                    _deny("CreateContainer", f"{where}.allow_host_namespaces",
                          f"the container has no {kind} namespace of its own")


# -- evaluation helpers -----------------------------------------------------------------


def _check_caps(method: str, proc: dict[str, Any]) -> None:
    caps = proc.get("capabilities")
    if caps is None:
        return
    if not isinstance(caps, dict):
        _deny(method, "create_container.allow_privileged", "capabilities is not an object")
    for kind in _CAP_SETS:
        got = caps.get(kind)
        if got is None:
            continue
        if not isinstance(got, list) or not all(isinstance(c, str) for c in got):
            _deny(method, "create_container.allow_privileged",
                  f"capabilities.{kind} is not a list of names")
        bad = sorted(c for c in got if c in PRIVILEGED_CAPS)
        if bad:
            _deny(method, "create_container.allow_privileged",
                  f"{kind} capabilities include {bad[0]}")


def _deny(method: str, rule: str, reason: str) -> NoReturn:
    # The reason quotes request text (an image name, an argv): keep it one line.
    reason = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in reason)
    raise PermissionDenied(f"agent policy: {method} denied by rule {rule}: {reason}")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _get(request: Any, name: str, kind: type) -> Any:
    """A field of a protobuf message or of a dict; a missing field is the
    protobuf default (""/False/None)."""
    value = request.get(name) if isinstance(request, Mapping) else getattr(request, name, None)
    if kind is str:
        value = "" if value is None else value
        if not isinstance(value, str):
            raise errors.InvalidArgument(f"agent policy: request field {name} is not a string")
    elif kind is bool:
        value = bool(value) if isinstance(value, bool) or value is None else None
        if value is None:
            raise errors.InvalidArgument(f"agent policy: request field {name} is not a boolean")
    return value


def _json_object(value: Any, what: str) -> dict[str, Any]:
    """The decoded JSON object of a bytes field (or an already decoded dict)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes | bytearray):
        raise errors.InvalidArgument(f"agent policy: {what} is missing")
    if len(value) > MAX_REQUEST_JSON:
        raise errors.InvalidArgument(f"agent policy: {what} is larger than {MAX_REQUEST_JSON}")
    try:
        obj = json.loads(bytes(value))
    except RecursionError:
        raise errors.InvalidArgument(f"agent policy: {what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument(f"agent policy: {what} is not JSON") from None
    if not isinstance(obj, dict):
        raise errors.InvalidArgument(f"agent policy: {what} is not a JSON object")
    return obj


def _argv_env(proc: Any, method: str) -> tuple[list[str], list[str]]:
    args = proc.get("args") if isinstance(proc, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        _deny(method, "commands", "the process has no argv (args) to check")
    env = proc.get("env", [])
    if env is None:
        env = []
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        _deny(method, "commands", "the process's env is not a list of strings")
    return args, env


def _scope_ok(rule: CommandRule, info: ContainerInfo) -> bool:
    if rule.containers is not None and not (
            info.id in rule.containers or (info.name and info.name in rule.containers)):
        return False
    return rule.images is None or _image_ok(rule.images, info)


def _command_ok(rule: CommandRule, argv: list[str], env: list[str]) -> bool:
    n = len(rule.argv)
    if rule.prefix:
        if tuple(argv[:n]) != rule.argv or len(argv) < n:
            return False
    elif tuple(argv) != rule.argv:
        return False
    if rule.env is None:
        return True
    return all(_env_ok(rule.env, e) for e in env)


def _env_ok(patterns: tuple[str, ...], entry: str) -> bool:
    name = entry.split("=", 1)[0]
    for p in patterns:
        if p == entry or (p.endswith("=*") and p[:-2] == name and "=" in entry):
            return True
    return False


def _image_ok(patterns: tuple[str, ...], info: ContainerInfo) -> bool:
    for p in patterns:
        if p.startswith("sha256:"):
            if info.image_digest and p == info.image_digest:
                return True
        elif p.endswith("*"):
            if info.image and info.image.startswith(p[:-1]):
                return True
        elif info.image and p == info.image:
            return True
    return False


def _canonical(path: str) -> bool:
    return (path.startswith("/") and not path.startswith("//") and "\0" not in path
            and posixpath.normpath(path) == path and len(path) <= MAX_STRING)


# -- validation helpers -----------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _invalid(_short(k), "duplicate key")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise _invalid("document", f"{name} is not JSON")


def _keys(obj: Any, where: str, allowed: set[str] | None,
          required: Iterable[str] = ()) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _invalid(where, "must be an object")
    if len(obj) > MAX_ITEMS:
        raise _invalid(where, f"more than {MAX_ITEMS} entries")
    for k in obj:
        if allowed is not None and k not in allowed:
            raise _invalid(where, f"unknown key {_short(k)!r}")
    for k in sorted(set(required) - set(obj)):
        raise _invalid(where, f"{k} is required")
    return obj


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _invalid(where, "must be a list")
    if len(value) > MAX_ITEMS:
        raise _invalid(where, f"more than {MAX_ITEMS} entries")
    return value


def _string(value: Any, where: str, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _invalid(where, "must be a string")
    if len(value) > MAX_STRING:
        raise _invalid(where, f"longer than {MAX_STRING} characters")
    if not value and not empty:
        raise _invalid(where, "must not be empty")
    if "\0" in value:
        raise _invalid(where, "contains a NUL character")
    return value


def _strings(value: Any, where: str, empty: bool = False) -> tuple[str, ...]:
    return tuple(_string(v, f"{where}[{i}]", empty) for i, v in enumerate(_list(value, where)))


def _choice(obj: dict[str, Any], key: str, where: str, choices: tuple[str, ...],
            default: str | None = None) -> str:
    if key not in obj:
        assert default is not None
        return default
    value = obj[key]
    if value not in choices or not isinstance(value, str):
        raise _invalid(where, f"must be one of {', '.join(choices)}")
    return value


def _bool(obj: dict[str, Any], key: str, where: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise _invalid(f"{where}.{key}", "must be true or false")
    return value


def _policy_path(value: Any, where: str) -> str:
    path = _string(value, where)
    directory = path.endswith("/") and path != "/"
    bare = path[:-1] if directory else path
    if not _canonical(bare):
        raise _invalid(where, f"{_short(path)!r} is not an absolute canonical path"
                              " (no '.', '..' or '//')")
    return path


def _image_pattern(value: Any, where: str) -> str:
    p = _string(value, where)
    if p.startswith("sha256:") and not _DIGEST.fullmatch(p):
        raise _invalid(where, "a digest is sha256: and 64 lowercase hex digits")
    if "*" in p[:-1]:
        raise _invalid(where, "'*' may only end a pattern")
    return p


def _commands(value: Any, where: str, scoped: bool) -> tuple[CommandRule, ...]:
    out = []
    allowed = {"argv", "match", "env"} | ({"containers", "images"} if scoped else set())
    for i, item in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        r = _keys(item, at, allowed, required={"argv"})
        argv = _strings(r["argv"], f"{at}.argv", empty=True)
        if not argv:
            raise _invalid(f"{at}.argv", "must not be empty")
        prefix = _choice(r, "match", f"{at}.match", ("exact", "prefix"), "exact") == "prefix"
        containers = _strings(r["containers"], f"{at}.containers") \
            if "containers" in r else None
        images = tuple(_image_pattern(p, f"{at}.images[{j}]")
                       for j, p in enumerate(_list(r["images"], f"{at}.images"))) \
            if "images" in r else None
        env = None
        if "env" in r:
            env = _strings(r["env"], f"{at}.env")
            for j, e in enumerate(env):
                if "=" not in e or e.startswith("="):
                    raise _invalid(f"{at}.env[{j}]", "must be NAME=value or NAME=*")
        out.append(CommandRule(argv, prefix, containers, images, env))
    return tuple(out)
