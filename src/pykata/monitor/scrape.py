"""One scrape of one shim's metrics socket, and what the monitor makes of it.

The shim serves ``GET /metrics`` (HTTP/1.1, the Prometheus text format) on
``<sandbox dir>/metrics.sock``. Its text is parsed with prometheus_client's
parser, every sample not named ``pykata_*`` (or claiming to be the monitor's own,
``pykata_monitor_*``) is dropped, and every sample gets the sandbox's labels
(sandbox_id, namespace, pod_name, pod_namespace, pod_uid), replacing any of the
same name it carried. The shim already sanitises what the guest reports; this
side is defensive all the same: the response is read up to a cap, a malformed
one fails that sandbox's scrape as a whole, and a sandbox may give at most
``MAX_SAMPLES`` samples.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from pykata.utils.unixsock import addressable

PREFIX = "pykata_"
OWN_PREFIX = "pykata_monitor_"
INFO_METRIC = "pykata_shim_sandbox_info"
SANDBOX_LABELS = ("sandbox_id", "namespace", "pod_name", "pod_namespace", "pod_uid")
POD_LABELS = SANDBOX_LABELS[2:]
MAX_RESPONSE_BYTES = 8 << 20
MAX_HEADER_BYTES = 64 * 1024
MAX_SAMPLES = 20000
MAX_LABEL_VALUE = 253  # a Kubernetes name's limit; longer pod labels are cut
# The classic format's names (the parser would also take quoted UTF-8 ones).
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# What the classic text format has; the OpenMetrics-only samples are dropped.
_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram",
          "summary": "summary", "unknown": "untyped"}
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
REQUEST = (b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"
           b"Accept: text/plain;version=0.0.4\r\nConnection: close\r\n\r\n")


class ScrapeError(Exception):
    """One sandbox's scrape failed; the message is one line."""


class NoSocket(ScrapeError):
    """The sandbox has no metrics socket (booting, gone, or a shim without one)."""


@dataclass(frozen=True)
class PodLabels:
    name: str = ""
    namespace: str = ""
    uid: str = ""

    def __bool__(self) -> bool:
        return bool(self.name or self.namespace or self.uid)


# -- HTTP over the unix socket ----------------------------------------------------------


def _check_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NoSocket("no metrics socket") from None
    except OSError as exc:
        raise ScrapeError(f"metrics socket: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ScrapeError("metrics socket is not a socket")
    if st.st_uid != os.geteuid():
        raise ScrapeError(f"metrics socket belongs to uid {st.st_uid}, not to us")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], cap: int) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ScrapeError("bad chunk size in the response") from None
            if size < 0 or len(body) + size > cap:
                raise ScrapeError(f"response over {cap} bytes")
            if size == 0:
                return bytes(body)
            body += (await reader.readexactly(size + 2))[:size]
    length = headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ScrapeError("bad Content-Length in the response") from None
        if n < 0 or n > cap:
            raise ScrapeError(f"response over {cap} bytes")
        return await reader.readexactly(n)
    body = bytearray()
    while chunk := await reader.read(65536):
        body += chunk
        if len(body) > cap:
            raise ScrapeError(f"response over {cap} bytes")
    return bytes(body)


async def fetch(path: Path, max_bytes: int = MAX_RESPONSE_BYTES) -> str:
    """The text a shim serves at GET /metrics on the unix socket ``path``
    (no deadline here: the caller bounds it). ScrapeError (NoSocket when there
    is no socket) on any failure."""
    _check_socket(path)
    try:
        with addressable(path) as addr:
            reader, writer = await asyncio.open_unix_connection(addr, limit=MAX_HEADER_BYTES)
    except OSError as exc:
        raise ScrapeError(f"cannot connect: {exc.strerror or exc}") from None
    try:
        writer.write(REQUEST)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        parts = status.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ScrapeError("not an HTTP response")
        if parts[1] != "200":
            raise ScrapeError(f"HTTP status {parts[1][:3]}")
        headers = {}
        for line in lines:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        ctype = headers.get("content-type", "text/plain")
        if not ctype.lower().startswith("text/plain"):
            raise ScrapeError(f"unexpected content type {ctype[:60]!r}")
        body = await _read_body(reader, headers, max_bytes)
    except asyncio.LimitOverrunError:
        raise ScrapeError("response headers too long") from None
    except asyncio.IncompleteReadError:
        raise ScrapeError("connection closed mid-response") from None
    except OSError as exc:
        raise ScrapeError(f"connection failed: {exc.strerror or exc}") from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ScrapeError("response is not UTF-8") from None


# -- parsing and labelling --------------------------------------------------------------


def parse(text: str, max_samples: int = MAX_SAMPLES) -> list[Metric]:
    """The pykata_* families of a shim's text (never pykata_monitor_*), in the
    classic format's names and types, samples without timestamps or exemplars.
    ScrapeError if the text does not parse or has more than ``max_samples``
    samples."""
    out: list[Metric] = []
    count = 0
    try:
        for fam in text_string_to_metric_families(text):
            if (not fam.name.startswith(PREFIX) or fam.name.startswith(OWN_PREFIX)
                    or fam.type not in _TYPES or not _NAME.fullmatch(fam.name)):
                continue
            kept = []
            for s in fam.samples:
                if (not s.name.startswith(PREFIX) or s.name.startswith(OWN_PREFIX)
                        or not _NAME.fullmatch(s.name)
                        or any(s.name == fam.name + x for x in _OM_SUFFIXES)
                        or not all(_LABEL.fullmatch(k) for k in s.labels)):
                    continue
                count += 1
                if count > max_samples:
                    raise ScrapeError(f"more than {max_samples} samples")
                kept.append(s._replace(timestamp=None, exemplar=None))
            fam.samples = kept
            out.append(fam)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ScrapeError(f"malformed metrics text: {' '.join(str(exc).split())[:120]}"
                          ) from None
    return out


def _clip(value: str) -> str:
    return value[:MAX_LABEL_VALUE]


def pod_labels(families: Iterable[Metric]) -> PodLabels:
    """The pod the shim names in its pykata_shim_sandbox_info sample (from the
    pod's CRI annotations; empty for a pod not made through CRI)."""
    for fam in families:
        if fam.name != INFO_METRIC:
            continue
        for s in fam.samples:
            if s.name == INFO_METRIC:
                return PodLabels(_clip(s.labels.get("pod_name", "")),
                                 _clip(s.labels.get("pod_namespace", "")),
                                 _clip(s.labels.get("pod_uid", "")))
    return PodLabels()


def sandbox_labels(sandbox_id: str, namespace: str, pod: PodLabels) -> dict[str, str]:
    return {"sandbox_id": sandbox_id, "namespace": namespace, "pod_name": pod.name,
            "pod_namespace": pod.namespace, "pod_uid": pod.uid}


def relabel(families: Iterable[Metric], labels: dict[str, str]) -> None:
    """Give every sample ``labels``, in place (replacing any of the same names)."""
    for fam in families:
        fam.samples = [s._replace(labels={**{k: v for k, v in s.labels.items()
                                             if k not in labels}, **labels})
                       for s in fam.samples]


class Merged:
    """Families of many sandboxes, merged by name into one exposition: the first
    sandbox to give a family fixes its type and help; a later one of another type
    is dropped, and a series seen twice is kept once."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self._seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        self.conflicts = 0

    def add(self, families: Iterable[Metric]) -> None:
        for fam in families:
            have = self.families.get(fam.name)
            if have is None:
                have = self.families[fam.name] = Metric(fam.name, fam.documentation,
                                                        fam.type, fam.unit)
            elif have.type != fam.type:
                self.conflicts += 1
                continue
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in self._seen:
                    continue
                self._seen.add(key)
                have.samples.append(s)

    def collect(self) -> list[Metric]:
        return list(self.families.values())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render(families: Iterable[Metric]) -> bytes:
    """The classic text format of ``families`` as ``parse`` left them: what
    prometheus_client's generate_latest writes for them, at a third of its cost
    (the label values are the only thing to escape; names were checked)."""
    out: list[str] = []
    for fam in families:
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        doc = fam.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {_TYPES[fam.type]}\n")
        for s in fam.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
            out.append(f"{s.name}{{{labels}}} {_value(s.value)}\n" if labels
                       else f"{s.name} {_value(s.value)}\n")
    return "".join(out).encode()
