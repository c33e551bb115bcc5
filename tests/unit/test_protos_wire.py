"""Wire facts of pykata's containerd and CRI schemas, checked independently of protoc.

The expected numbers and names below were read from upstream, not from our .proto files:

- containerd ``runtime/v2/task/shim.proto`` (branch release/1.6, tag v1.6.39; the same
  file is ``api/runtime/task/v2/shim.proto`` in 1.7): package ``containerd.task.v2``,
  service ``Task`` with 17 RPCs; CreateTaskRequest id=1, bundle=2, rootfs=3, terminal=4,
  stdin=5, stdout=6, stderr=7, checkpoint=8, parent_checkpoint=9, options=10;
  DeleteResponse pid=1, exit_status=2, exited_at=3.
- containerd ``api/types/mount.proto`` (release/1.6): ``containerd.types.Mount`` type=1,
  source=2, target=3, options=4.
- containerd ``api/types/task/task.proto`` (release/1.6): package ``containerd.v1.types``,
  enum Status UNKNOWN..PAUSING = 0..5.
- containerd ``api/events/task.proto`` (release/1.6): package ``containerd.events``;
  TaskExit has id=2 while TaskDelete has id=5.
- containerd ``api/services/ttrpc/events/v1/events.proto`` (release/1.6): service
  ``containerd.services.events.ttrpc.v1.Events`` rpc Forward; ForwardRequest envelope=1;
  Envelope timestamp=1, namespace=2, topic=3, event=4.
- containerd ``runtime/v2/runc/options/oci.proto`` (release/1.6) and
  ``api/types/runc/options/oci.proto`` (1.7): package ``containerd.runc.v1``.
- containerd 1.6 ``vendor/github.com/containerd/typeurl/types.go``: an Any's type URL is
  the bare protobuf full name (``proto.MessageName``), e.g. "containerd.events.TaskCreate".
- containerd/cgroups ``cgroup1/stats/metrics.proto`` and ``cgroup2/stats/metrics.proto``
  (main): packages ``io.containerd.cgroups.v1`` / ``io.containerd.cgroups.v2``; the v2
  Metrics has no field 3.
- kubernetes/cri-api ``pkg/apis/runtime/v1/api.proto`` (tag v0.28.15, release-1.28):
  package ``runtime.v1``; RunPodSandboxRequest config=1, runtime_handler=2;
  ImageSpec.user_specified_image=18; ContainerConfig.CDI_devices=17.
"""

from __future__ import annotations

from google.protobuf import any_pb2, timestamp_pb2

from pykata.protos import (
    cgroups_v1_metrics_pb2,
    cgroups_v2_metrics_pb2,
    containerd_events_pb2,
    containerd_eventsvc_pb2,
    containerd_runc_options_pb2,
    containerd_shim_pb2,
    containerd_task_types_pb2,
    containerd_types_pb2,
    cri_api_pb2,
)

# --- a tiny independent encoder: tag = field << 3 | wire type -----------------------

VARINT, LEN = 0, 2


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return key(field, LEN) + varint(len(data)) + data


def vi(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint(value)


def field_numbers(message_cls: type) -> dict[str, int]:
    return {f.name: f.number for f in message_cls.DESCRIPTOR.fields}


# --- containerd task service ----------------------------------------------------------

TASK_RPCS = [
    "State",
    "Create",
    "Start",
    "Delete",
    "Pids",
    "Pause",
    "Resume",
    "Checkpoint",
    "Kill",
    "Exec",
    "ResizePty",
    "CloseIO",
    "Update",
    "Wait",
    "Stats",
    "Connect",
    "Shutdown",
]


def test_encoder_self_check() -> None:
    assert key(1, LEN) == b"\x0a"
    assert key(18, LEN) == b"\x92\x01"
    assert varint(300) == b"\xac\x02"


def test_create_task_request_bytes() -> None:
    msg = containerd_shim_pb2.CreateTaskRequest(id="c1", bundle="/b", stdout="/o", terminal=True)
    expected = b"\x0a\x02c1\x12\x02/b\x20\x01\x32\x02/o"
    assert expected == ld(1, "c1") + ld(2, "/b") + vi(4, 1) + ld(6, "/o")
    assert msg.SerializeToString(deterministic=True) == expected
    assert containerd_shim_pb2.CreateTaskRequest.FromString(expected) == msg


def test_create_task_request_rootfs_and_options() -> None:
    mount = ld(1, "overlay") + ld(2, "overlay") + ld(4, "lowerdir=/l") + ld(4, "workdir=/w")
    opts = ld(1, "containerd.runc.v1.Options") + ld(2, vi(6, 0) + ld(6, "runc"))
    wire = ld(1, "c1") + ld(3, mount) + ld(10, opts)
    msg = containerd_shim_pb2.CreateTaskRequest.FromString(wire)
    assert msg.rootfs[0].type == "overlay"
    assert list(msg.rootfs[0].options) == ["lowerdir=/l", "workdir=/w"]
    assert msg.options.type_url == "containerd.runc.v1.Options"
    runc = containerd_runc_options_pb2.Options.FromString(msg.options.value)
    assert runc.binary_name == "runc"


def test_task_service_names() -> None:
    svc = containerd_shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert svc.full_name == "containerd.task.v2.Task"
    assert [m.name for m in svc.methods] == TASK_RPCS
    assert svc.methods_by_name["Create"].input_type.full_name == (
        "containerd.task.v2.CreateTaskRequest"
    )
    empties = {
        "Pause",
        "Resume",
        "Checkpoint",
        "Kill",
        "Exec",
        "ResizePty",
        "CloseIO",
        "Update",
        "Shutdown",
    }
    for m in svc.methods:
        if m.name in empties:
            assert m.output_type.full_name == "google.protobuf.Empty", m.name


def test_task_field_numbers() -> None:
    assert field_numbers(containerd_shim_pb2.CreateTaskRequest) == {
        "id": 1,
        "bundle": 2,
        "rootfs": 3,
        "terminal": 4,
        "stdin": 5,
        "stdout": 6,
        "stderr": 7,
        "checkpoint": 8,
        "parent_checkpoint": 9,
        "options": 10,
    }
    assert field_numbers(containerd_shim_pb2.StateResponse)["exec_id"] == 11
    assert field_numbers(containerd_shim_pb2.ConnectResponse) == {
        "shim_pid": 1,
        "task_pid": 2,
        "version": 3,
    }
    assert field_numbers(containerd_types_pb2.Mount) == {
        "type": 1,
        "source": 2,
        "target": 3,
        "options": 4,
    }


def test_delete_response_bytes() -> None:
    # What `containerd-shim-*-v2 delete` writes to stdout.
    ts = vi(1, 1_700_000_000) + vi(2, 5)
    wire = vi(1, 42) + vi(2, 137) + ld(3, ts)
    msg = containerd_shim_pb2.DeleteResponse(
        pid=42, exit_status=137, exited_at=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    )
    assert msg.SerializeToString(deterministic=True) == wire


def test_status_enum() -> None:
    status = containerd_task_types_pb2.Status
    assert containerd_task_types_pb2.DESCRIPTOR.package == "containerd.v1.types"
    assert [(status.Name(i), i) for i in range(6)] == [
        ("UNKNOWN", 0),
        ("CREATED", 1),
        ("RUNNING", 2),
        ("STOPPED", 3),
        ("PAUSED", 4),
        ("PAUSING", 5),
    ]
    state = containerd_shim_pb2.StateResponse(status=containerd_task_types_pb2.RUNNING)
    assert state.SerializeToString() == vi(4, 2)


# --- events -----------------------------------------------------------------------------

EVENTS = [
    "TaskCreate",
    "TaskStart",
    "TaskDelete",
    "TaskIO",
    "TaskExit",
    "TaskOOM",
    "TaskExecAdded",
    "TaskExecStarted",
    "TaskPaused",
    "TaskResumed",
    "TaskCheckpointed",
]


def test_event_full_names() -> None:
    names = containerd_events_pb2.DESCRIPTOR.message_types_by_name
    assert sorted(names) == sorted(EVENTS)
    for name in EVENTS:
        assert names[name].full_name == f"containerd.events.{name}"


def test_exit_and_delete_differ_in_id_position() -> None:
    assert field_numbers(containerd_events_pb2.TaskExit) == {
        "container_id": 1,
        "id": 2,
        "pid": 3,
        "exit_status": 4,
        "exited_at": 5,
    }
    assert field_numbers(containerd_events_pb2.TaskDelete) == {
        "container_id": 1,
        "pid": 2,
        "exit_status": 3,
        "exited_at": 4,
        "id": 5,
    }
    assert field_numbers(containerd_events_pb2.TaskCreate) == {
        "container_id": 1,
        "bundle": 2,
        "rootfs": 3,
        "io": 4,
        "checkpoint": 5,
        "pid": 6,
    }


def test_forward_request_bytes() -> None:
    start = containerd_events_pb2.TaskStart(container_id="c1", pid=7)
    start_wire = ld(1, "c1") + vi(2, 7)
    assert start.SerializeToString() == start_wire

    # containerd 1.6 typeurl: the type URL is the bare full name, no "type.googleapis.com/".
    event = any_pb2.Any(type_url=start.DESCRIPTOR.full_name, value=start.SerializeToString())
    env = containerd_eventsvc_pb2.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=10),
        namespace="k8s.io",
        topic="/tasks/start",
        event=event,
    )
    req = containerd_eventsvc_pb2.ForwardRequest(envelope=env)
    env_wire = (
        ld(1, vi(1, 10))
        + ld(2, "k8s.io")
        + ld(3, "/tasks/start")
        + ld(4, ld(1, "containerd.events.TaskStart") + ld(2, start_wire))
    )
    assert req.SerializeToString(deterministic=True) == ld(1, env_wire)


def test_events_service_names() -> None:
    svc = containerd_eventsvc_pb2.DESCRIPTOR.services_by_name["Events"]
    assert svc.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert [m.name for m in svc.methods] == ["Forward"]
    assert field_numbers(containerd_eventsvc_pb2.Envelope) == {
        "timestamp": 1,
        "namespace": 2,
        "topic": 3,
        "event": 4,
    }
    assert field_numbers(containerd_eventsvc_pb2.ForwardRequest) == {"envelope": 1}


# --- runc options and metrics -----------------------------------------------------------


def test_runc_options_names() -> None:
    assert containerd_runc_options_pb2.Options.DESCRIPTOR.full_name == "containerd.runc.v1.Options"
    assert (
        containerd_runc_options_pb2.CheckpointOptions.DESCRIPTOR.full_name
        == "containerd.runc.v1.CheckpointOptions"
    )
    nums = field_numbers(containerd_runc_options_pb2.Options)
    assert nums["binary_name"] == 6
    assert nums["systemd_cgroup"] == 9
    assert nums["task_api_address"] == 12  # 1.7 addition; unset by 1.6


def test_cgroup_metrics_names() -> None:
    v1 = cgroups_v1_metrics_pb2.Metrics.DESCRIPTOR
    v2 = cgroups_v2_metrics_pb2.Metrics.DESCRIPTOR
    assert v1.full_name == "io.containerd.cgroups.v1.Metrics"
    assert v2.full_name == "io.containerd.cgroups.v2.Metrics"
    assert field_numbers(cgroups_v1_metrics_pb2.Metrics)["memory"] == 4
    assert 3 not in {f.number for f in v2.fields}
    assert field_numbers(cgroups_v2_metrics_pb2.Metrics)["memory"] == 4
    mem = cgroups_v2_metrics_pb2.Metrics(memory=cgroups_v2_metrics_pb2.MemoryStat(usage=4096))
    assert mem.SerializeToString() == ld(4, vi(32, 4096))


# --- CRI ----------------------------------------------------------------------------------


def test_cri_service_names() -> None:
    rt = cri_api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
    img = cri_api_pb2.DESCRIPTOR.services_by_name["ImageService"]
    assert rt.full_name == "runtime.v1.RuntimeService"
    assert img.full_name == "runtime.v1.ImageService"
    assert {m.name for m in img.methods} == {
        "ListImages",
        "ImageStatus",
        "PullImage",
        "RemoveImage",
        "ImageFsInfo",
    }
    assert len(rt.methods) == 29
    events = rt.methods_by_name["GetContainerEvents"]
    assert events.server_streaming and not events.client_streaming
    assert events.input_type.full_name == "runtime.v1.GetEventsRequest"


def test_cri_field_numbers() -> None:
    assert field_numbers(cri_api_pb2.RunPodSandboxRequest) == {"config": 1, "runtime_handler": 2}
    assert field_numbers(cri_api_pb2.ImageSpec)["user_specified_image"] == 18
    assert field_numbers(cri_api_pb2.ContainerConfig)["CDI_devices"] == 17
    assert field_numbers(cri_api_pb2.LinuxContainerSecurityContext)["run_as_group"] == 12


def test_cri_bytes() -> None:
    req = cri_api_pb2.RunPodSandboxRequest(
        config=cri_api_pb2.PodSandboxConfig(
            metadata=cri_api_pb2.PodSandboxMetadata(name="p", uid="u", namespace="default"),
        ),
        runtime_handler="kata",
    )
    meta = ld(1, "p") + ld(2, "u") + ld(3, "default")
    assert req.SerializeToString(deterministic=True) == ld(1, ld(1, meta)) + ld(2, "kata")
    spec = cri_api_pb2.ImageSpec(image="busybox", user_specified_image="busybox")
    assert spec.SerializeToString() == ld(1, "busybox") + b"\x92\x01\x07busybox"
