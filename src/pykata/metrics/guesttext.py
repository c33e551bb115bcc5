"""The guest's metrics text (the agent's GetMetrics), read as hostile input.

The guest is not trusted: its text is parsed here by a strict grammar and only
what passes is handed on as values, which the host then writes out itself
(``pykata.metrics.collector``), so nothing the guest sends can add a line, a
label or a metric of the host's. What is kept:

- at most ``MAX_TEXT`` bytes (a longer text is refused whole), ``MAX_SAMPLES``
  samples, ``MAX_FAMILIES`` metric names;
- names starting ``pykata_guest_`` or ``pykata_agent_``, and none of the
  host's own names (``RESERVED_PREFIXES``);
- types counter, gauge and untyped (a counter's samples are its name, with or
  without ``_total``; it is written out as ``NAME_total``);
- at most ``MAX_LABELS`` labels, names of the plain grammar and none of the
  identity labels pykata-monitor lifts onto every sample (``RESERVED_LABELS``),
  values of at most ``MAX_LABEL_VALUE`` characters;
- finite values (a counter's also not negative); a timestamp is dropped.

Everything else is dropped line by line and counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MAX_TEXT = 512 * 1024
MAX_SAMPLES = 4096
MAX_FAMILIES = 256
MAX_LABELS = 8
MAX_LABEL_VALUE = 256
MAX_HELP = 256
MAX_NAME = 128

ALLOWED_PREFIXES = ("pykata_guest_", "pykata_agent_")
# Names the host writes itself about the agent: the guest may not use them.
RESERVED_PREFIXES = ("pykata_agent_rpc_", "pykata_agent_scrape_")
# pykata_shim_sandbox_info's labels, which pykata-monitor puts on every sample.
RESERVED_LABELS = frozenset({"sandbox_id", "namespace", "pod_name", "pod_namespace",
                             "pod_uid", "process", "le", "quantile"})

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?"
                    r"|[Nn]a[Nn]|[-+]?[Ii]nf)")
_TYPES = {"counter", "gauge", "untyped"}


class GuestTextError(ValueError):
    """The whole text is refused (too long, not text)."""


@dataclass
class Family:
    name: str  # a counter's without _total
    kind: str  # counter | gauge | untyped
    help: str = ""
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


@dataclass
class Parsed:
    families: dict[str, Family] = field(default_factory=dict)
    dropped: int = 0  # lines (or samples) refused
    samples: int = 0


def _allowed_name(name: str) -> bool:
    return (len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None
            and name.startswith(ALLOWED_PREFIXES) and not name.startswith(RESERVED_PREFIXES))


def _base(name: str, kind: str) -> str:
    return name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name


def _parse_labels(text: str) -> tuple[dict[str, str], str] | None:
    """``{a="x",b="y"} rest``: the labels and what follows; None if malformed."""
    assert text.startswith("{")
    labels: dict[str, str] = {}
    i, n = 1, len(text)
    while True:
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == "}":
            return labels, text[i + 1:]
        m = _LABEL_NAME.match(text, i)
        if m is None:
            return None
        name = m.group(0)
        i = m.end()
        if text[i:i + 2] != '="':
            return None
        i += 2
        value: list[str] = []
        while True:
            if i >= n or len(value) > MAX_LABEL_VALUE:
                return None
            c = text[i]
            if c == '"':
                i += 1
                break
            if c == "\\":
                nxt = text[i + 1:i + 2]
                if nxt == "n":
                    value.append("\n")
                elif nxt in ('"', "\\"):
                    value.append(nxt)
                else:
                    return None
                i += 2
                continue
            value.append(c)
            i += 1
        if name in labels or len(labels) >= MAX_LABELS:
            return None
        labels[name] = "".join(value)
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] == "}":
            continue
        else:
            return None


def _printable(s: str) -> bool:
    return s.isprintable()


def parse(raw: str | bytes) -> Parsed:
    """The guest's text, filtered (GuestTextError if refused whole)."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_TEXT:
            raise GuestTextError(f"guest metrics text of {len(raw)} bytes (limit {MAX_TEXT})")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GuestTextError("guest metrics text is not UTF-8") from None
    if len(raw.encode("utf-8", "replace")) > MAX_TEXT:
        raise GuestTextError(f"guest metrics text longer than {MAX_TEXT} bytes")
    out = Parsed()
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    exposed: set[str] = set()
    for line in raw.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                arg = parts[3] if len(parts) > 3 else ""
                if not _allowed_name(name):
                    out.dropped += 1
                elif parts[1] == "TYPE":
                    if arg.strip() not in _TYPES or name in types:
                        out.dropped += 1
                    else:
                        types[name] = arg.strip()
                elif name not in helps:
                    text = arg.replace("\\n", " ").replace("\\\\", "\\")
                    helps[name] = "".join(c for c in text if c.isprintable())[:MAX_HELP]
            continue
        sample = _parse_sample(line)
        if sample is None:
            out.dropped += 1
            continue
        name, labels, value = sample
        # Which family: declared by TYPE as this name, or as a counter without _total.
        if name in types:
            declared = name
        elif name.endswith("_total") and types.get(name[: -len("_total")]) == "counter":
            declared = name[: -len("_total")]
        else:
            declared = name
        kind = types.get(declared, "untyped")
        if kind == "counter" and value < 0:
            out.dropped += 1
            continue
        base = _base(declared, kind)
        fam = out.families.get(base)
        if fam is None:
            # Each family is written out under one name (a counter's NAME_total):
            # two families may not come to the same one.
            written = base + "_total" if kind == "counter" else base
            if len(out.families) >= MAX_FAMILIES or written in exposed:
                out.dropped += 1
                continue
            exposed.add(written)
            fam = out.families[base] = Family(base, kind, helps.get(declared, ""))
        elif fam.kind != kind:
            out.dropped += 1
            continue
        key = (base, tuple(sorted(labels.items())))
        if key in seen or out.samples >= MAX_SAMPLES:
            out.dropped += 1
            continue
        seen.add(key)
        fam.samples.append((labels, value))
        out.samples += 1
    for fam in out.families.values():
        if not fam.help:
            fam.help = helps.get(fam.name, "") or helps.get(fam.name + "_total", "")
    return out


def _parse_sample(line: str) -> tuple[str, dict[str, str], float] | None:
    m = _NAME.match(line)
    if m is None:
        return None
    name = m.group(0)
    if not _allowed_name(name):
        return None
    rest = line[m.end():]
    labels: dict[str, str] = {}
    if rest.startswith("{"):
        got = _parse_labels(rest)
        if got is None:
            return None
        labels, rest = got
        if any(k in RESERVED_LABELS or k.startswith("__") for k in labels):
            return None
        if not all(_printable(v) for v in labels.values()):
            return None
    if not rest.startswith(" "):
        return None
    fields = rest.split()
    if not 1 <= len(fields) <= 2 or _VALUE.fullmatch(fields[0]) is None:
        return None
    if len(fields) == 2 and not fields[1].lstrip("-").isdigit():
        return None
    value = float(fields[0])
    if not math.isfinite(value):
        return None
    return name, labels, value
