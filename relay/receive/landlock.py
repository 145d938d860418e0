"""Confining what a toolkit process may write, with Linux's Landlock (no privileges needed).

A tool that names its files from peer text (DCMTK's getscu in bit-preserving mode writes
`<folder>/<the PACS's SOP Instance UID>`, unchecked: "../x" leaves the folder) is started
with `confine_writes(folder)` as the last step before exec: from then on the process and its
children may create, write, rename or remove files only under that folder; reading and
executing stay as they were. Where the kernel has no Landlock (before 5.13, or not enabled),
`available()` says so and the caller uses the tool in a mode that names files itself.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

# x86-64 and aarch64 share these (the generic syscall table numbers them alike since 5.13).
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Every way of changing the file system (LANDLOCK_ACCESS_FS_*), by the ABI that added it.
_WRITE_FILE = 1 << 1
_WRITES_ABI1 = _WRITE_FILE | sum(1 << bit for bit in range(4, 13))  # remove/make anything
_REFER = 1 << 13  # ABI 2: links and renames across folders
_TRUNCATE = 1 << 14  # ABI 3


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none."""
    if os.uname().machine not in ("x86_64", "aarch64"):
        return 0
    version = _libc().syscall(_CREATE_RULESET, None, ctypes.c_size_t(0),
                              ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(0, int(version))


def available() -> bool:
    return abi() >= 1


def write_rights(version: int) -> int:
    """The write rights a ruleset of this ABI handles (all of them: none is granted outside
    the folder)."""
    rights = _WRITES_ABI1
    if version >= 2:
        rights |= _REFER
    if version >= 3:
        rights |= _TRUNCATE
    return rights


def confine_writes(folder: Path) -> None:
    """In the child, before exec: writes only under `folder` from now on (raises OSError when
    the kernel refuses; the process then never runs the tool)."""
    libc = _libc()
    rights = write_rights(abi())
    attr = _RulesetAttr(rights)
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(
        ctypes.sizeof(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        where = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            rule = _PathBeneathAttr(rights, where)
            if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule),
                            ctypes.c_uint32(0)) < 0:
                raise OSError(ctypes.get_errno(), "landlock_add_rule")
        finally:
            os.close(where)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
