"""The C library, as ctypes sees it in this process.

``dlopen(NULL)`` finds libc's symbols (Python links against it) without
``ctypes.util.find_library``, whose import pulls in shutil, tempfile, random
and the compression modules: about 1 MiB more in every shim.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
