"""The same C functions run natively (ctypes) and emulated in a kernel context agree.

fixtures/src/cfuncs.c is compiled twice: as a -mcmodel=kernel relocatable object that
``load_relocatable`` places at the module address 0xffffffffc0000000 and ``call`` runs
under Unicorn, and as a host shared library called through ctypes. Native execution on
this CPU is the independent truth; CRC-32 is also checked against ``zlib.crc32``.
"""

from __future__ import annotations

import ctypes
import itertools
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from kctx_debug.emulator.call import (
    ARGUMENT_REGISTERS,
    STACK_ALIGNMENT,
    CallError,
    call,
    plan_call,
)
from kctx_debug.emulator.elfload import load_relocatable
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.snapshot_io import parse_snapshot

SOURCE = Path(__file__).resolve().parent.parent / "fixtures" / "src" / "cfuncs.c"
KERNEL_FLAGS = (
    "-O2 -ffreestanding -fno-pic -mcmodel=kernel -mno-red-zone -fno-stack-protector "
    "-fno-asynchronous-unwind-tables -mgeneral-regs-only"
).split()
pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")

MODULE_BASE = 0xFFFF_FFFF_C000_0000
TEXT_VA = 0xFFFF_FFFF_8100_0000  # one hlt: the snapshot's RIP, used as the return address
DIRECT_MAP = 0xFFFF_8880_0000_0000
DATA_VA = DIRECT_MAP + 0x100_0000  # inputs and outputs live here
STACK_TOP = DIRECT_MAP + 0xF0_0000
HLT = b"\xf4"
U64 = (1 << 64) - 1


def signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cfuncs")
    obj, lib = folder / "cfuncs.o", folder / "libcfuncs.so"
    for argv in (
        ["gcc", *KERNEL_FLAGS, "-c", str(SOURCE), "-o", str(obj)],
        ["gcc", "-O2", "-shared", "-fPIC", str(SOURCE), "-o", str(lib)],
    ):
        subprocess.run(argv, check=True, capture_output=True)
    return obj, lib


@pytest.fixture()
def native(objects, tmp_path) -> ctypes.CDLL:
    """A fresh copy of the library per test, so ``accumulator`` starts at 0 in both builds."""
    copy = tmp_path / "libcfuncs.so"  # dlopen of a new path loads a new instance
    shutil.copy(objects[1], copy)
    lib = ctypes.CDLL(str(copy))
    lib.crc32.restype = ctypes.c_uint32
    lib.crc32.argtypes = [ctypes.c_char_p, ctypes.c_uint64]
    lib.copy_and_sum.restype = ctypes.c_uint64
    lib.copy_and_sum.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64]
    lib.list_sum.restype = ctypes.c_long
    lib.list_sum.argtypes = [ctypes.c_void_p]
    lib.accumulate.restype = ctypes.c_long
    lib.accumulate.argtypes = [ctypes.c_long]
    lib.apply_op.restype = ctypes.c_long
    lib.apply_op.argtypes = [ctypes.c_ulong, ctypes.c_long]
    lib.many_args.restype = ctypes.c_long
    lib.many_args.argtypes = [ctypes.c_long] * 8
    return lib


def kernel_context() -> KernelContext:
    mappings = [
        (TEXT_VA, 0x20_0000, 0x1000, "4K", ["G"]),
        (MODULE_BASE, 0x40_0000, 0x10_0000, "4K", ["RW"]),
        (DIRECT_MAP, 0, 0x200_0000, "2M", ["RW", "XD"]),
    ]
    doc = {
        "format": "kctx-snapshot",
        "version": 1,
        "cpu": {
            "regs": {"rip": hex(TEXT_VA), "rsp": hex(STACK_TOP), "rflags": "0x2"},
            "cr0": "0x80050033",
            "cr3": "0x100000",
            "cr4": "0x6a0",
            "msrs": {"efer": "0xd00"},
        },
        "memory": [{"base": "0x0", "size": "0x2000000", "kind": "zero"}],
        "build": {
            "page_tables": {
                "levels": 4,
                "tables": {"base": "0x100000", "size": "0x40000"},
                "mappings": [
                    {"va": hex(va), "pa": hex(pa), "size": hex(size), "page_size": ps, "flags": fl}
                    for va, pa, size, ps, fl in mappings
                ],
            }
        },
    }
    ctx = KernelContext.from_snapshot(parse_snapshot(doc))
    ctx.mem.write(0x20_0000, HLT)
    return ctx


@pytest.fixture()
def emulated(objects):
    """(machine, module) with cfuncs.o relocated at the module base."""
    from kctx_debug.emulator.machine import Machine

    ctx = kernel_context()
    module = load_relocatable(ctx, objects[0], MODULE_BASE)
    machine = Machine.from_context(ctx)
    yield machine, module
    machine.close()
    ctx.close()


def test_kernel_object_needs_every_relocation_type(objects):
    with open(objects[0], "rb") as f:
        elf = ELFFile(f)
        kinds = {
            reloc["r_info_type"]
            for section in elf.iter_sections()
            if isinstance(section, RelocationSection)
            for reloc in section.iter_relocations()
        }
    # psABI numbers: R_X86_64_64 1, PC32 2, PLT32 4, 32S 11.
    assert {1, 2, 4, 11} <= kinds


def test_crc32(emulated, native):
    machine, module = emulated
    rng = random.Random(1)
    for length in (0, 1, 7, 64, 1000, 4096 + 13):
        data = rng.randbytes(length)
        machine.write_virtual(DATA_VA, data)
        got = call(machine, module.symbols.address("crc32"), DATA_VA, length) & 0xFFFF_FFFF
        assert got == native.crc32(data, length) == zlib.crc32(data)


def test_copy_and_sum(emulated, native):
    machine, module = emulated
    rng = random.Random(2)
    for length in (0, 3, 257, 5000):
        src = rng.randbytes(length)
        dst_va, src_va = DATA_VA + 0x4_0000, DATA_VA
        machine.write_virtual(src_va, src)
        got = call(machine, module.symbols.address("copy_and_sum"), dst_va, src_va, length)
        dst = ctypes.create_string_buffer(length or 1)
        assert got == native.copy_and_sum(dst, src, length)
        assert machine.read_virtual(dst_va, length) == src == dst.raw[:length]


def test_list_sum(emulated, native):
    machine, module = emulated
    rng = random.Random(3)
    values = [rng.randrange(-(1 << 40), 1 << 40) for _ in range(50)]
    # Guest: nodes scattered over two pages in reverse order; struct node {next; value}.
    addresses = [DATA_VA + 0x8_0000 + 16 * (3 * i % 512) for i in range(len(values))]
    for i, (va, value) in enumerate(zip(addresses, values, strict=True)):
        nxt = addresses[i + 1] if i + 1 < len(values) else 0
        machine.write_virtual(va, struct.pack("<Qq", nxt, value))

    class Node(ctypes.Structure):
        pass

    Node._fields_ = [("next", ctypes.POINTER(Node)), ("value", ctypes.c_long)]
    nodes = [Node(None, v) for v in values]
    for a, b in itertools.pairwise(nodes):
        a.next = ctypes.pointer(b)
    want = native.list_sum(ctypes.byref(nodes[0]))
    assert signed(call(machine, module.symbols.address("list_sum"), addresses[0])) == want
    assert want == sum(values)
    assert call(machine, module.symbols.address("list_sum"), 0) == native.list_sum(None) == 0


def test_global_state_and_nested_call(emulated, native):
    machine, module = emulated
    accumulate = module.symbols.address("accumulate")
    for x in (1, -5, 100, 1 << 40):
        assert signed(call(machine, accumulate, x)) == native.accumulate(x)
    accumulator = module.symbols.address("accumulator")
    expected = sum(7 * x + 3 for x in (1, -5, 100, 1 << 40))
    assert struct.unpack("<q", machine.read_virtual(accumulator, 8))[0] == expected


def test_function_pointer_table(emulated, native):
    machine, module = emulated
    for which in range(8):
        for x in (0, 9, -12345, 1 << 50):
            got = signed(call(machine, module.symbols.address("apply_op"), which, x))
            assert got == native.apply_op(which, x)


def test_stack_arguments(emulated, native):
    machine, module = emulated
    args = (1, -2, 3, 1 << 33, -(1 << 20), 6, 7_000_000_000, -8)
    got = signed(call(machine, module.symbols.address("many_args"), *args))
    assert got == native.many_args(*args) == sum((i + 1) * a for i, a in enumerate(args))


def test_registers_restored_after_call(emulated):
    machine, module = emulated
    before = {name: machine.reg_read(name) for name in ("rip", "rsp", "rdi", "rax", "rflags")}
    call(machine, module.symbols.address("scale"), 4, 5)
    after = {name: machine.reg_read(name) for name in before}
    assert after == before


def test_return_address_reentered_by_callee(emulated, native):
    # Returning to scale's entry: accumulate calls scale first, in a deeper frame.
    machine, module = emulated
    got = call(
        machine,
        module.symbols.address("accumulate"),
        10,
        return_address=module.symbols.address("scale"),
    )
    assert signed(got) == native.accumulate(10) == 73


def test_faulting_callee_raises_and_restores(emulated):
    machine, module = emulated
    rip, rsp = machine.reg_read("rip"), machine.reg_read("rsp")
    unmapped = 0xFFFF_C900_0000_0000
    with pytest.raises(CallError, match="did not return") as info:
        call(machine, module.symbols.address("list_sum"), unmapped)
    assert info.value.registers["rip"] != TEXT_VA
    assert (machine.reg_read("rip"), machine.reg_read("rsp")) == (rip, rsp)


def test_instruction_budget(emulated):
    machine, module = emulated
    with pytest.raises(CallError, match="did not return"):
        call(machine, module.symbols.address("crc32"), DATA_VA, 100_000, max_instructions=50)


# -- the frame layout, without a machine -----------------------------------------------------


def test_plan_call_alignment_and_stack_arguments():
    for top in (0x1000, 0x1008, 0x100F):
        for n in range(10):
            args = tuple(range(100, 100 + n))
            frame = plan_call(0xAAAA, args, stack_top=top, return_address=0xBBBB)
            # psABI 3.2.2: at entry rsp + 8 is 16-aligned; nothing at or above top is written.
            assert (frame.rsp + 8) % STACK_ALIGNMENT == 0
            assert frame.rsp + len(frame.stack) <= top
            slots = struct.unpack(f"<{len(frame.stack) // 8}Q", frame.stack)
            assert slots == (0xBBBB, *args[6:])
            assert [frame.registers[r] for r in ARGUMENT_REGISTERS[:n]] == list(args[:6])
            assert frame.registers["rip"] == 0xAAAA and frame.registers["rsp"] == frame.rsp


def test_plan_call_rejects_bad_arguments():
    with pytest.raises(CallError, match="argument 2 must be an integer"):
        plan_call(0x1000, (1, "x"), stack_top=0x2000, return_address=0)
    with pytest.raises(CallError, match="does not fit in 64 bits"):
        plan_call(0x1000, (1 << 64,), stack_top=0x2000, return_address=0)
    assert plan_call(0x1000, (-1,), stack_top=0x2000, return_address=0).registers["rdi"] == U64
