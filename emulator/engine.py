"""Unicorn 2.1 internals kctx-debug relies on, each found by experiment at run time.

- The instruction counter. ``emu_start(count=N)`` makes Unicorn call a C hook before
  every instruction (about 100 million instructions a second here, against 1.3-2
  billion with no hook; a Python hook per instruction manages 1.6 million). Its
  counter, ``uc_struct.emu_counter``, is the only exact count Unicorn keeps, and the
  Python binding does not expose it: :func:`probe_engine_layout` finds its offset by
  running a scratch engine twice with known counts and accepts it only if both runs
  agree on one place. It counts *started* instructions. Without it,
  :class:`InstructionCounter` counts with a Python hook: exact, 1000 times slower.
- The exception in flight. Unicorn never runs QEMU's interrupt delivery, which is
  what resets its nested-fault bookkeeping (``env->old_exception``): after a #PF,
  #GP or #DE handled in a hook the next one is promoted to #DF, and the one after
  that "resets the machine" (the run just stops). Worse, Unicorn records faults it
  takes silently: looking up cached code for an unmapped address
  (``ctl_remove_cache``) or probing the byte before ``emu_start``'s ``until``
  address both leave one in flight (measured). The probe finds the field in a saved
  context; :func:`clear_exception_in_flight` rewrites it (save, patch, restore).
- The ``until`` address is therefore never used (:func:`disable_exits`); runs stop
  at an address with a code hook bounded to it.
- RAM offsets. Each ``mem_map``/``mem_map_ptr`` region gets a ``ram_addr`` range,
  and QEMU finds translated code by ``ram_addr``. Unicorn 2.1 places a new region
  after the *tail* of its RAM list (``find_ram_offset_last``), which it keeps sorted
  largest first, but inserting a larger region in the middle leaves the tail where
  it was: the next region then shares ``ram_addr`` pages with the larger one. A
  store to such a page looks like self-modifying code to QEMU when code was
  translated from its twin: the current block is invalidated and the instruction
  restarted, so the counting hook sees it twice (measured: a ``call`` pushing onto
  a stack page whose twin holds the call itself was counted twice).
  :func:`map_host_ranges` maps regions largest first, so each one goes at the tail
  and the ranges do not overlap.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc, UcError
from unicorn import x86_const as x86

from ..arch.vectors import Vector
from ..errors import KctxError
from ..physmem import HostRange

__all__ = [
    "EmulatorError",
    "EngineLayout",
    "InstructionCounter",
    "clear_exception_in_flight",
    "disable_exits",
    "map_host_ranges",
    "probe_engine_layout",
]


class EmulatorError(KctxError):
    """The emulator cannot do what was asked (a bad argument, an engine that cannot start)."""


# -- probing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineLayout:
    """Offsets of Unicorn 2.1 internals, found by experiment (None: not found).

    ``counter_offset``: ``uc_struct.emu_counter`` from the engine handle (``emu_count``
    follows it). ``old_exception_offset``: QEMU's ``env->old_exception`` in the bytes
    of a saved context.
    """

    counter_offset: int | None
    old_exception_offset: int | None


_PROBE_CODE = 0x1000
_PROBE_SCAN = 0x1000  # bytes of uc_struct searched: its jmp_bufs alone are 12 KiB
_PROBE_COUNTS = (0x1A3, 0x2B7)
# mov ax, 0x10; mov ds, ax -- #GP(0x10) with a GDT limit of 7 (SDM vol. 3A 3.4.3).
_PROBE_GP = bytes.fromhex("66b81000 8ed8")
# xor ecx, ecx; div ecx -- #DE.
_PROBE_DE = bytes.fromhex("31c9 f7f1")
_NO_EXCEPTION = struct.pack("<i", -1)


def _probe_counter(uc: Uc) -> int | None:
    candidates = None
    for count in _PROBE_COUNTS:
        uc.emu_start(_PROBE_CODE, 0, count=count)
        raw = ctypes.string_at(uc._uch.value, _PROBE_SCAN)
        # The hook that stops the run has counted one instruction more than ``count``.
        hits = {
            o for o in range(0, _PROBE_SCAN - 16, 8)
            if struct.unpack_from("<QQ", raw, o) == (count + 1, count)
        }  # fmt: skip
        candidates = hits if candidates is None else candidates & hits
    return next(iter(candidates)) if candidates and len(candidates) == 1 else None


def _probe_old_exception(uc: Uc) -> int | None:
    vectors: list[int] = []

    def on_interrupt(uc: Uc, vector: int, _data: object) -> None:
        vectors.append(vector)
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_interrupt)
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0, 7, 0))
    uc.mem_write(_PROBE_CODE, _PROBE_GP + _PROBE_DE)
    uc.ctl_remove_cache(_PROBE_CODE, _PROBE_CODE + 0x1000)
    before = bytes(uc.context_save())
    uc.emu_start(_PROBE_CODE, 0, count=10)
    after = uc.context_save()
    blob = bytes(after)
    gp = struct.pack("<i", Vector.GP)
    hits = [
        o for o in range(0, min(len(before), len(blob)) - 3, 4)
        if before[o : o + 4] == _NO_EXCEPTION and blob[o : o + 4] == gp
    ]  # fmt: skip
    if vectors != [Vector.GP] or len(hits) != 1:
        return None
    _patch_context(after, hits[0])
    uc.context_restore(after)
    uc.emu_start(_PROBE_CODE + len(_PROBE_GP), 0, count=10)
    return hits[0] if vectors == [Vector.GP, Vector.DE] else None


def _patch_context(context: object, offset: int) -> None:
    address = ctypes.cast(context.context, ctypes.c_void_p).value  # type: ignore[attr-defined]
    ctypes.memmove(address + offset, _NO_EXCEPTION, len(_NO_EXCEPTION))


def disable_exits(uc: Uc) -> None:
    """Make ``emu_start`` ignore its ``until`` argument (see the module docstring)."""
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])


def map_host_ranges(uc: Uc, ranges: Iterable[HostRange]) -> None:
    """``mem_map_ptr`` every range, largest first (see the module docstring: RAM offsets).

    Only right for a fresh engine: after an unmap Unicorn searches for gaps instead.
    """
    for host in sorted(ranges, key=lambda r: -r.size):  # stable: equal sizes keep order
        uc.mem_map_ptr(host.base, host.size, UC_PROT_ALL, host.address)


def probe_engine_layout() -> EngineLayout:
    """Find :class:`EngineLayout` in a scratch engine (a few milliseconds)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    disable_exits(uc)
    uc.mem_map(_PROBE_CODE, 0x1000)
    uc.mem_write(_PROBE_CODE, b"\x90" * 0x1000)  # nop
    try:
        counter = _probe_counter(uc)
        old_exception = _probe_old_exception(uc)
    except UcError:
        return EngineLayout(None, None)
    return EngineLayout(counter, old_exception)


# -- using it ------------------------------------------------------------------------


class InstructionCounter:
    """Instructions the last ``emu_start`` started; see the module docstring."""

    def __init__(self, uc: Uc, layout: EngineLayout) -> None:
        self._uc = uc
        self.exact_native = layout.counter_offset is not None
        self._stop_at: int | None = None
        if self.exact_native:
            address = uc._uch.value + layout.counter_offset
            self._cell = ctypes.c_uint64.from_address(address)
            # ``uc_struct.emu_count``: the counting hook stops the run once the counter
            # passes it, before the instruction it is counting executes.
            self._limit = ctypes.c_uint64.from_address(address + 8)
        else:
            self._python = 0
            uc.hook_add(UC_HOOK_CODE, self._count)

    def _count(self, uc: Uc, _address: int, _size: int, _data: object) -> None:
        self._python += 1
        if self._stop_at is not None and self._python > self._stop_at:
            uc.emu_stop()

    def reset(self) -> None:
        self._stop_at = None
        if not self.exact_native:
            self._python = 0

    def stop_after_current(self) -> None:
        """From inside a hook: end the run before the next instruction starts.

        The instruction in progress completes; the next one is counted (as a budget
        stop counts the instruction it prevented) and not executed. ``emu_stop`` in a
        memory hook would instead abandon the instruction after its store, leaving RIP
        on it.
        """
        if self.exact_native:
            self._limit.value = self._cell.value
        else:
            self._stop_at = self._python

    def read(self) -> int:
        return self._cell.value if self.exact_native else self._python


def clear_exception_in_flight(uc: Uc, layout: EngineLayout) -> None:
    """Reset QEMU's ``old_exception`` so the next fault keeps its vector (no-op if unknown)."""
    offset = layout.old_exception_offset
    if offset is None:
        return
    context = uc.context_save()
    address = ctypes.cast(context.context, ctypes.c_void_p).value
    if ctypes.string_at(address + offset, len(_NO_EXCEPTION)) != _NO_EXCEPTION:
        _patch_context(context, offset)
        uc.context_restore(context)
