"""The host <-> guest contract: names and numbers both sides must agree on.

The host (hypervisor command line, shared fs, spec conversion, agent client)
and the guest agent import these from here, so a change is made once. This
module is shipped in the guest image: stdlib only, no imports at all, cheap
to load at boot. Behaviour (what the agent does with a storage, a marker, a
request) is documented where it is implemented; this is only the vocabulary.

Agent channel
    The agent serves ttRPC on the virtio-serial port ``SERIAL_PORT_NAME`` if
    the VM has one, else on vsock port ``VSOCK_PORT`` (any CID). Kernel
    parameters ``AGENT_LOG_PARAM=debug`` and ``AGENT_CHANNEL_PARAM=CHANNEL``
    override its log level and channel.
Services
    ``AGENT_SERVICE`` and ``HEALTH_SERVICE`` are the full ttRPC service names
    of ``protos/agent.proto`` (package ``pykata.agent.v1``).
Shared file system
    The host exports the sandbox's shared directory over virtio-fs with tag
    ``SHARED_FS_TAG``; the guest mounts it at ``GUEST_SHARED_DIR``, where each
    container's root filesystem and bind sources appear below
    ``<GUEST_SHARED_DIR>/<container>/``.
Guest directories
    ``GUEST_STATE_DIR`` is the agent's state (bundles below ``containers/``);
    hot-plugged disks a container mounts go below ``GUEST_STORAGE_DIR``,
    pod-wide volumes (emptyDir, the pod's /dev/shm) below ``GUEST_SANDBOX_DIR``.
Markers in requests
    ``SANDBOX_SCOPE`` in a Storage's ``driver_options``: the storage belongs to
    the pod (mounted once, kept until the sandbox is destroyed).
    ``SANDBOX_NS_MARKER`` as a namespace path in an OCI spec: "the pod sandbox
    container's namespace", for the kinds in ``POD_SHARED_NAMESPACES``.
    ``QUIESCED`` as the message of an UNAVAILABLE status: the agent ended (or
    refused) a blocking call because a checkpoint is being taken
    (PrepareCheckpoint); the host calls again once the sandbox runs again
    (FinishCheckpoint). Never an exit or an end of stream.
    ``HOOK_STATE_ANNOTATION`` in an OCI spec's annotations: what the state of
    the hooks the guest runs (createContainer, startContainer) needs from the
    host (JSON: bundle, ociVersion); the agent takes it out of the annotations.
Storage drivers
    ``STORAGE_DRIVERS``: the ``driver`` values of a Storage the agent mounts.
Guest image
    ``GUEST_MODULES_FILE``: kernel modules the agent loads at boot, in order
    (written by the image builder).
"""

# -- agent channel ------------------------------------------------------------------------
VSOCK_PORT = 1024
SERIAL_PORT_NAME = "agent.channel.0"
AGENT_LOG_PARAM = "pykata.agent.log"
AGENT_CHANNEL_PARAM = "pykata.agent.channel"
# Kernel parameter naming the guest container engine: "native" (default) or "crun".
AGENT_ENGINE_PARAM = "pykata.agent.engine"
# Port forwarding (CRI PortForward) has a channel of its own, framed by
# pykata.ttrpc.mux: this virtio-serial port, else this vsock port.
PORTFWD_SERIAL_PORT_NAME = "pykata.portfwd.0"
PORTFWD_VSOCK_PORT = 1026

# -- ttRPC services ----------------------------------------------------------------------
AGENT_PROTO_PACKAGE = "pykata.agent.v1"
AGENT_SERVICE = AGENT_PROTO_PACKAGE + ".AgentService"
HEALTH_SERVICE = AGENT_PROTO_PACKAGE + ".Health"

# -- shared file system and guest directories ---------------------------------------------
SHARED_FS_TAG = "pykatashared"
GUEST_STATE_DIR = "/run/pykata"
GUEST_SHARED_DIR = GUEST_STATE_DIR + "/shared"
GUEST_STORAGE_DIR = GUEST_STATE_DIR + "/storage"
GUEST_SANDBOX_DIR = GUEST_STATE_DIR + "/sandbox"

# -- markers ------------------------------------------------------------------------------
SANDBOX_SCOPE = "pykata.scope=sandbox"
SANDBOX_NS_MARKER = "pykata:sandbox"
POD_SHARED_NAMESPACES = ("ipc", "uts")
HOOK_STATE_ANNOTATION = "io.github.pykata.hook-state"
QUIESCED = "pykata: agent quiesced for a checkpoint; call again after it"

# -- storages -----------------------------------------------------------------------------
STORAGE_DRIVERS = ("virtiofs", "tmpfs", "local", "blk", "bind")

# -- guest image --------------------------------------------------------------------------
GUEST_MODULES_FILE = "/etc/pykata/modules"
# The read-only root image (rootfs = "image"): the file system starts this far
# into the file (before it, the pmem PFN info block), on the device the guest
# finds by these names; the early initrd mounts it (DAX on pmem).
ROOT_IMAGE_DATA_OFFSET = 2 << 20
ROOT_PMEM_DEVICE = "/dev/pmem0"  # nvdimm or virtio-pmem
ROOT_BLK_DEVICE = "/dev/vda"  # virtio-blk (the first disk: the root comes first)
