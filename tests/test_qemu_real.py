"""Import a real QEMU dump of a booted Debian 6.1 cloud kernel and check it against the guest.

The guest (busybox initramfs, KASLR on) writes its own /proc/kallsyms to a serial
port and idles; QMP then dumps its memory. The oracles are independent of our
code: the guest's kallsyms, the version string in the bzImage setup header
(read from /boot), pyelftools' view of the ELF, and Linux's fixed GDT layout
(arch/x86/include/asm/segment.h). Two CPUs models: ``qemu64`` (4-level paging,
no PTI) and ``max`` (5-level paging, CR4.LA57).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from qemu.boot import QEMU, QemuGuest, find_kernel
from qemu.initramfs import BUSYBOX, build_initramfs, kallsyms_init_script

from kctx_debug.arch.bits import CR4
from kctx_debug.arch.descriptors import SystemDescriptor, SystemDescriptorType
from kctx_debug.pagetables.context import KernelContext
from kctx_debug.qemu_dump import import_qemu_dump, kaslr_offset, read_qemu_dump
from kctx_debug.snapshot import RangeKind
from kctx_debug.snapshot_io import load_snapshot
from kctx_debug.symbols import SymbolTable
from kctx_debug.tables import decode_gdt, decode_idt, decode_tss

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SYSTEM_DEPS = REPO / "scripts" / "system-deps.sh"
BOOT_TIMEOUT = 150.0
SETTLE_SECONDS = 1.0
DUMP_TRIES = 5
LINK_TEXT = 0xFFFFFFFF81000000  # __START_KERNEL_map + 16 MiB: _text before the KASLR slide
# Linux 6.1 IDT entries for exceptions (arch/x86/kernel/idt.c): vector -> entry symbol.
EXCEPTION_ENTRIES = {
    0: "asm_exc_divide_error",
    1: "asm_exc_debug",
    2: "asm_exc_nmi",
    3: "asm_exc_int3",
    6: "asm_exc_invalid_op",
    8: "asm_exc_double_fault",
    13: "asm_exc_general_protection",
    14: "asm_exc_page_fault",
}
# GDT_ENTRY_* (arch/x86/include/asm/segment.h, 64-bit): selector -> (kind, DPL).
KERNEL_GDT = {0x10: ("code64", 0), 0x18: ("data", 0), 0x2B: ("data", 3), 0x33: ("code64", 3)}
TSS_SELECTOR = 0x40


def _have_packages() -> bool:
    return shutil.which(QEMU) is not None and BUSYBOX.exists() and find_kernel() is not None


def _ensure_system_deps() -> None:
    """Run scripts/system-deps.sh (idempotent, fast when all is there); skip only if it can't."""
    if os.geteuid() != 0 and not _have_packages():
        pytest.skip("QEMU, busybox-static or a 6.1 cloud kernel missing, and not root to install")
    subprocess.run(["bash", str(SYSTEM_DEPS)], check=True, timeout=900)
    assert _have_packages(), "scripts/system-deps.sh ran but the packages are still missing"


@dataclass
class GuestDump:
    core: Path
    kallsyms_path: Path
    kallsyms: SymbolTable
    kernel: Path
    cpu_model: str


def _dump_while_idle(vm: QemuGuest, core: Path) -> None:
    """Dump once init has gone to sleep: the vCPU then idles in the kernel (CPL0).

    Right after the end marker the shell may still be in user mode (with PTI its CR3
    would not map the kernel), so give it a moment and dump again if it was.
    """
    for _ in range(DUMP_TRIES):
        time.sleep(SETTLE_SECONDS)
        vm.dump(core)
        if read_qemu_dump(core).cpu.cpl == 0:
            return
        core.unlink()
    raise AssertionError(f"the guest was in user mode in {DUMP_TRIES} dumps")


@pytest.fixture(scope="module", params=["qemu64", "max"])
def guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GuestDump:
    _ensure_system_deps()
    work = tmp_path_factory.mktemp(f"qemu-{request.param}")
    kernel = find_kernel()
    assert kernel is not None
    t0 = time.monotonic()
    initrd = work / "initramfs.cpio"
    initrd.write_bytes(build_initramfs(BUSYBOX, kallsyms_init_script()))
    core = work / "guest.core"
    with QemuGuest(work, kernel, initrd, cpu_model=request.param) as vm:
        vm.start()
        text = vm.wait_for_kallsyms(BOOT_TIMEOUT)
        t1 = time.monotonic()
        _dump_while_idle(vm, core)
        t2 = time.monotonic()
    kallsyms_path = work / "kallsyms"
    kallsyms_path.write_text(text)
    table = SymbolTable.from_kallsyms(kallsyms_path)
    print(
        f"\n[{request.param}] {kernel.name}: boot + kallsyms {t1 - t0:.1f} s, "
        f"dump {t2 - t1:.1f} s ({core.stat().st_size >> 20} MiB), {len(table)} symbols"
    )
    return GuestDump(core, kallsyms_path, table, kernel, request.param)


@pytest.fixture
def ctx(guest: GuestDump):
    t0 = time.monotonic()
    context = KernelContext.from_snapshot(read_qemu_dump(guest.core))
    print(f"[{guest.cpu_model}] read_qemu_dump + context: {time.monotonic() - t0:.3f} s")
    yield context
    context.close()


def test_elf_layout_agrees_with_pyelftools(guest: GuestDump) -> None:
    snap = read_qemu_dump(guest.core)
    with open(guest.core, "rb") as f:
        loads = [s.header for s in ELFFile(f).iter_segments() if s.header.p_type == "PT_LOAD"]
    expected = [(h.p_paddr, h.p_filesz, h.p_offset) for h in loads]
    assert [(r.base, r.size, r.offset) for r in snap.memory] == expected
    assert all(r.kind is RangeKind.FILE and r.path == "guest.core" for r in snap.memory)
    assert any(r.offset % 0x1000 for r in snap.memory)  # QEMU does not page-align them
    assert snap.memory[0].base == 0 and snap.memory[0].size == 256 << 20


def test_cpu_state_and_inference(guest: GuestDump, ctx: KernelContext) -> None:
    cpu = ctx.cpu
    assert ctx.snapshot.source["cpus"] == 1
    assert ctx.snapshot.source["inferred"] == ["msrs.efer.LME", "msrs.efer.LMA", "msrs.efer.NXE"]
    assert cpu.msrs["efer"] == 0xD00
    assert cpu.segments["cs"].selector == 0x10 and cpu.cpl == 0  # the guest idles in the kernel
    assert cpu.segments["cs"].attributes == 0xA09B  # G, L, P, DPL0, code execute/read accessed
    assert guest.kallsyms.lookup(cpu.regs["rip"]) is not None
    assert bool(cpu.cr4 & CR4.LA57) == (guest.cpu_model == "max")
    assert ctx.mode.name == ("5-level" if guest.cpu_model == "max" else "4-level")


def test_kernel_text_and_banner(guest: GuestDump, ctx: KernelContext) -> None:
    text = guest.kallsyms.address("_text")
    assert ctx.translate(text).ok
    assert ctx.translate(text).executable
    # The bzImage setup header holds "RELEASE (BUILDER) UTS_VERSION" (boot protocol:
    # kernel_version at 0x20E points to it, minus 0x200); linux_banner in guest memory
    # is "Linux version RELEASE (BUILDER) (COMPILER) UTS_VERSION\n".
    image = guest.kernel.read_bytes()
    (pointer,) = struct.unpack_from("<H", image, 0x20E)
    header_version = image[pointer + 0x200 :].split(b"\0")[0].decode()
    release, _, rest = header_version.partition(" ")
    uts_version = rest.split(") ", 1)[1]
    banner = ctx.read_virtual(guest.kallsyms.address("linux_banner"), 512).split(b"\0")[0]
    banner_text = banner.decode()
    assert banner_text.startswith(f"Linux version {release} (")
    assert banner_text.rstrip("\n").endswith(uts_version)


def test_idt_handlers_are_exception_entries(guest: GuestDump, ctx: KernelContext) -> None:
    gates = {e.vector: e.gate for e in decode_idt(ctx.mem, ctx.cpu, ctx.virt_to_phys)}
    assert len(gates) == 256
    for vector, name in EXCEPTION_ENTRIES.items():
        gate = gates[vector]
        assert (gate.p, gate.selector, gate.type) == (
            True,
            0x10,
            SystemDescriptorType.INTERRUPT_GATE,
        )
        assert gate.offset == guest.kallsyms.address(name), f"vector {vector}"
    assert gates[3].dpl == 3 and gates[14].dpl == 0
    assert gates[8].ist != 0 and gates[14].ist == 0


def test_kaslr_slide(guest: GuestDump, ctx: KernelContext) -> None:
    assert kaslr_offset(ctx, guest.kallsyms) == 0
    slide = guest.kallsyms.address("_text") - LINK_TEXT
    assert slide >= 0 and slide % (2 << 20) == 0
    assert kaslr_offset(ctx, guest.kallsyms.relocated(-slide)) == slide


def test_tss_stacks_are_mapped(ctx: KernelContext) -> None:
    tss = decode_tss(ctx.mem, ctx.cpu, ctx.virt_to_phys)
    assert ctx.translate(tss.rsp0 - 8).ok
    gates = {e.vector: e.gate for e in decode_idt(ctx.mem, ctx.cpu, ctx.virt_to_phys)}
    # #DF, NMI and #DB run on IST stacks Linux always maps (cpu_entry_area exception
    # stacks); the #VC one (vector 29) exists only in SEV-ES guests.
    for vector in (8, 2, 1):
        ist = gates[vector].ist
        assert ist != 0, f"vector {vector} has no IST"
        top = tss.ist[ist - 1]
        result = ctx.translate(top - 8)
        assert result.ok and result.writable, f"vector {vector}: IST{ist} at {top:#x}"
    assert not ctx.translate(tss.ist[gates[29].ist - 1] - 8).ok


def test_gdt_has_the_kernel_descriptors(ctx: KernelContext) -> None:
    entries = {e.index: e.descriptor for e in decode_gdt(ctx.mem, ctx.cpu, ctx.virt_to_phys)}
    for selector, (kind, dpl) in KERNEL_GDT.items():
        desc = entries[selector >> 3]  # the index; the low 3 bits are TI and RPL
        assert (desc.kind, desc.dpl, desc.p) == (kind, dpl, True), f"selector {selector:#x}"
    tss = entries[TSS_SELECTOR >> 3]
    assert isinstance(tss, SystemDescriptor)
    assert tss.base == ctx.cpu.tr.base and ctx.cpu.tr.selector == TSS_SELECTOR
    # The GDT says busy (LTR set it); QEMU's cached TR type says available: both kept.
    assert tss.type == SystemDescriptorType.TSS_BUSY
    assert ctx.cpu.tr.attributes & 0xF == SystemDescriptorType.TSS_AVAILABLE


def test_import_document_with_symbols(guest: GuestDump) -> None:
    out = guest.core.with_name("guest.json")
    t0 = time.monotonic()
    import_qemu_dump(guest.core, out, symbols=guest.kallsyms_path)
    print(f"[{guest.cpu_model}] import_qemu_dump: {time.monotonic() - t0:.3f} s")
    snap = load_snapshot(out)
    assert snap.source["kaslr"]["offset"] == "0x0"
    assert snap.symbols[0].kind == "kallsyms" and snap.symbols[0].path == "kallsyms"
    context = KernelContext.from_snapshot(snap)
    try:
        hit = context.symbols.lookup(context.cpu.regs["rip"])
        assert hit is not None
        page_fault = context.symbols.address("asm_exc_page_fault")
        phys = context.virt_to_phys(page_fault)
        assert context.read_virtual(page_fault, 16) == _elf_read_phys(guest.core, phys, 16)
    finally:
        context.close()


def _elf_read_phys(core: Path, phys: int, size: int) -> bytes:
    """Bytes at a guest-physical address, located through pyelftools' program headers."""
    with open(core, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            h = seg.header
            if h.p_type == "PT_LOAD" and h.p_paddr <= phys < h.p_paddr + h.p_filesz:
                f.seek(h.p_offset + phys - h.p_paddr)
                return f.read(size)
    raise AssertionError(f"{phys:#x} is in no PT_LOAD")


def test_cli_opens_the_dump(guest: GuestDump) -> None:
    """`kctx-debug vmcore --batch -ex "info registers"` shows CR3, IDTR, GDTR and TR; `import`."""
    snap = read_qemu_dump(guest.core)
    cpu = snap.cpu
    run = [sys.executable, "-m", "kctx_debug.cli"]
    out = subprocess.run(
        [*run, str(guest.core), "--symbols", str(guest.kallsyms_path), "--batch",
         "-ex", "info registers", "-ex", "info idt 14"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"cr3            {cpu.cr3:#018x}" in out
    assert f"gdtr           base={cpu.gdtr.base:#x} limit={cpu.gdtr.limit:#x}" in out
    assert f"idtr           base={cpu.idtr.base:#x} limit={cpu.idtr.limit:#x}" in out
    assert f"tr             0x0040 (GDT[8] RPL0)  base={cpu.tr.base:#x}" in out
    assert "asm_exc_page_fault" in out
    doc = guest.core.with_name("cli.json")
    subprocess.run([*run, "import", str(guest.core), "-o", str(doc)], check=True)
    dump = subprocess.run([*run, "ptdump", str(doc), "--json"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    ranges = json.loads(dump)["ranges"]
    text = guest.kallsyms.address("_text")
    assert any(r["present"] and r["start"] <= text < r["end"] for r in ranges)
