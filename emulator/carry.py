"""The register state carried across the CPL0 template's restore, in two engine calls.

:meth:`~kctx_debug.emulator.machine.Machine.enter_ring0` restores a context saved at
CPL0 (only that, or an instruction, gives CS/SS their hidden parts and the CPL) and
must then put back everything else: general, control and debug registers, MSRs,
descriptor-table registers, x87/SSE state. Read one at a time through the Python
binding that is about fifty calls each way, most of a trap delivery's cost;
:class:`CarriedState` reads them all with one ``uc_reg_read_batch`` into buffers
allocated once, and writes them back with one ``uc_reg_write_batch``.

Buffer layouts are Unicorn's (``unicorn/x86.h``): ``uc_x86_msr`` (index, value),
``uc_x86_mmr`` (selector, base, limit, flags), ``uc_x86_float80`` (mantissa,
exponent); XMM registers are 16 bytes.
"""

from __future__ import annotations

import ctypes

from unicorn import Uc, UcError
from unicorn import x86_const as x86

from ..arch.registers import lookup_register
from .engine import EmulatorError
from .privilege import DATA_SEGMENTS
from .registers import MSR_REGISTER, TABLE_REGISTERS, UC_REGISTER_IDS

__all__ = ["CarriedState"]

_DATA_BASES = ("fs_base", "gs_base")
# Written first, in this order: the rest is checked against the paging state they set.
_PAGING_FIRST = ("cr3", "cr4", "efer", "cr0")
# Carried besides the paging registers; the data segments and their bases are read
# only (the caller reloads them through the guest's GDT).
_CARRIED = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", *(f"r{n}" for n in range(8, 16)),
    "rflags", "cr2", "cr8", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7",
    "star", "lstar", "cstar", "sfmask", "kernel_gs_base", "tsc_aux", "pat",
)  # fmt: skip
# The x87 status word first: ST(i) is a physical register chosen by its TOP field
# (SDM vol. 1 8.1.2), so it must be in place before ST0..ST7 are written.
_VECTOR_STATE = (
    x86.UC_X86_REG_FPCW, x86.UC_X86_REG_FPSW, x86.UC_X86_REG_FPTAG, x86.UC_X86_REG_MXCSR,
    *(getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16)),
    *(getattr(x86, f"UC_X86_REG_ST{i}") for i in range(8)),
)  # fmt: skip
_XMM = frozenset(getattr(x86, f"UC_X86_REG_XMM{i}") for i in range(16))
_ST = frozenset(getattr(x86, f"UC_X86_REG_ST{i}") for i in range(8))


class _Msr(ctypes.Structure):
    _fields_ = (("index", ctypes.c_uint32), ("value", ctypes.c_uint64))


class _Mmr(ctypes.Structure):
    _fields_ = (
        ("selector", ctypes.c_uint16),
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class _Float80(ctypes.Structure):
    _fields_ = (("mantissa", ctypes.c_uint64), ("exponent", ctypes.c_uint16))


def _buffer(name: str) -> tuple[int, ctypes.Structure | ctypes.Array | ctypes.c_uint64]:
    """Unicorn's id for ``name`` and a buffer of its layout."""
    if name in UC_REGISTER_IDS:
        return UC_REGISTER_IDS[name], ctypes.c_uint64()
    msr = lookup_register(name).msr
    assert msr is not None, name
    return MSR_REGISTER, _Msr(int(msr), 0)


def _vector_buffer(reg: int) -> ctypes.Structure | ctypes.Array | ctypes.c_uint64:
    if reg in _XMM:
        return (ctypes.c_uint8 * 16)()
    if reg in _ST:
        return _Float80()
    return ctypes.c_uint64()


class _Batch:
    """Register ids and pointers to their buffers, in one order."""

    def __init__(self, entries: list[tuple[int, object]]) -> None:
        self.count = ctypes.c_int(len(entries))
        self.ids = (ctypes.c_int * len(entries))(*(reg for reg, _buf in entries))
        self.pointers = (ctypes.c_void_p * len(entries))(
            *(ctypes.addressof(buf) for _reg, buf in entries)  # type: ignore[arg-type]
        )


class CarriedState:
    """One engine's carried registers: :meth:`save`, then :meth:`restore` after a context
    restore. Not reentrant: one saved state at a time."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._named: dict[str, tuple[int, object]] = {
            name: _buffer(name)
            for name in (*_PAGING_FIRST, *_CARRIED, *DATA_SEGMENTS, *_DATA_BASES)
        }
        self._named.update((name, (reg, _Mmr())) for name, reg in TABLE_REGISTERS.items())
        # Kept referenced: the batches hold only their addresses.
        self._vector = [(reg, _vector_buffer(reg)) for reg in _VECTOR_STATE]
        self._read = _Batch([*self._named.values(), *self._vector])
        # Paging first, then the table registers (their bases are linear addresses),
        # then the rest.
        order = (*_PAGING_FIRST, *TABLE_REGISTERS, *_CARRIED)
        self._write = _Batch([*(self._named[n] for n in order), *self._vector])

    def _call(self, function, batch: _Batch, what: str) -> None:
        status = function(batch.ids, batch.pointers, batch.count)
        if status:
            raise EmulatorError(f"{what} of the carried registers failed: {UcError(status)}")

    def save(self) -> None:
        """Read every carried register (PKRU aside: the caller handles it)."""
        self._call(self._uc._do_reg_read_batch, self._read, "reading")

    def restore(self) -> None:
        """Write back what :meth:`save` read, except the data segment registers and bases."""
        self._call(self._uc._do_reg_write_batch, self._write, "writing")

    def __getitem__(self, name: str) -> int:
        """A saved general, control, debug or MSR value, or a data segment selector."""
        buf = self._named[name][1]
        return buf.value  # type: ignore[attr-defined]

    def data_segments(self) -> dict[str, int]:
        """The saved DS/ES/FS/GS selectors and FS/GS bases, by name."""
        return {name: self[name] for name in (*DATA_SEGMENTS, *_DATA_BASES)}
