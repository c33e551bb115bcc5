"""The in-agent container engine: the agent creates container processes
itself (fork, namespaces, mounts, cgroup, capabilities, seccomp, execve),
without a runtime binary. Imported lazily, on the first create.

| module | job |
|---|---|
| `plan.py` | OCI spec -> Plan (pure): every decision and every refusal, before any fork |
| `caps.py` | capability names -> bits (pure) |
| `mounts.py` | spec mounts -> flags, data, remount steps; `secure_join` inside the rootfs |
| `devices.py` | device nodes; device cgroup as an eBPF program (assembled here), bpf(2) |
| `seccomp.py` | linux.seccomp -> rules (pure) -> BPF via libseccomp (ctypes), once per container |
| `cgroup.py` | cgroup v2: create, resources -> files (pure), freeze, signal, remove |
| `syscalls.py` | ctypes system calls of the child (setns, unshare, pivot_root, capset, ...) |
| `child.py` | the forked child: the steps in kernel order, errors over a CLOEXEC pipe, execve |
| `forkserver.py` | a lean process forking for the agent: spare (new pid ns), worker |
| `runner.py` | the agent's side: prepare, fork (server or agent), start, exec, remove |

See docs/engine.md for the steps and why they are in that order.
"""
