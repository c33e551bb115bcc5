"""Just enough ELF64 (little-endian) reading for the image: whether a file is a
complete ELF (the vmlinux taken out of a bzImage), and the loader and needed
libraries of a program (library pruning). Pure; no tools."""

from __future__ import annotations

import struct
from dataclasses import dataclass


def elf_complete(data: bytes) -> bool:
    """A 64-bit ELF whose section header table (at the end) is all there."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    return bool(len(data) >= shoff + shentsize * shnum)


@dataclass(frozen=True)
class ElfInfo:
    interp: str | None  # PT_INTERP (the dynamic loader), None for static binaries
    needed: tuple[str, ...]  # DT_NEEDED


def elf_info(data: bytes) -> ElfInfo | None:
    """Loader and needed libraries of a little-endian ELF64 file, None if not one."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    interp: str | None = None
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(data):
            return None
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, off)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
        elif p_type == 3:  # PT_INTERP
            interp = data[p_offset:p_offset + p_filesz].split(b"\0", 1)[0].decode()
    if dynamic is None:
        return ElfInfo(interp, ())
    strtab_vaddr = None
    needed_offsets = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1] - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed_offsets.append(val)
        elif tag == 5:  # DT_STRTAB
            strtab_vaddr = val
    if strtab_vaddr is None:
        return ElfInfo(interp, ())
    strtab = next((strtab_vaddr - v + o for v, o, sz in loads if v <= strtab_vaddr < v + sz),
                  None)
    if strtab is None:
        return None
    names = tuple(data[strtab + n:data.index(b"\0", strtab + n)].decode()
                  for n in needed_offsets)
    return ElfInfo(interp, names)
