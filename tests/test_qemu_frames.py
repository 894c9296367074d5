"""The trap fixtures under QEMU (TCG): the frames QEMU's CPU pushes equal ours.

How QEMU gets the snapshot's state (no firmware runs): QEMU starts halted
(``-S``) with the snapshot's physical memory placed by ``-device loader`` and a
GDB remote stub on a UNIX socket. Over the stub we write CR4, EFER, CR3 and CR0
(long mode with the fixture's own page tables) and CS/SS (QEMU reads the
descriptors through GDTR, which is 0 after reset: the QEMU copy of the
snapshot maps linear 0 to the fixture's GDT page). What the stub cannot write
(GDTR, IDTR, TR, STAR/LSTAR/FMASK) a small boot stub loads, assembled from the
snapshot's values and mapped at 0x5000 in the QEMU copy only; it then
``iretq``s to the fixture's ring-3 entry. A breakpoint at the handler stops QEMU
there and the stub reads RSP, CR2 and the frame.

Not compared: the timer fixture (an external interrupt at an exact instruction
count has no QEMU equivalent through the GDB stub), and RFLAGS.RF in fault
frames, which QEMU 7.2 never sets (platform notes; the SDM sets it, and the
hand-computed frames in test_trap_fixtures.py check ours against the SDM).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_trap_fixtures import enter_handler, symbols

from kctx_debug.emulator.machine import Machine
from kctx_debug.pagetables.context import KernelContext, open_context
from kctx_debug.snapshot_io import parse_snapshot
from kctx_debug.traps.debugger import Debugger

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-system-x86_64", "as", "ld", "objcopy")),
        reason="needs qemu-system-x86_64 and binutils (scripts/system-deps.sh)",
    ),
]

TRAPS = Path(__file__).resolve().parent.parent / "fixtures" / "traps"
STUB_VA = STUB_PA = 0x5000  # unused by every fixture; the stub's stack is the page's top
PAGE = 0x1000
RF = 1 << 16  # RFLAGS.RF (SDM vol. 1 3.4.3)
TIMEOUT = 20.0
# IA32_STAR, IA32_LSTAR, IA32_FMASK (SDM vol. 4 Table 2-2).
STUB_MSRS = (("star", 0xC0000081), ("lstar", 0xC0000082), ("sfmask", 0xC0000084))


class GdbRemote:
    """The few GDB remote-protocol packets this test needs, over a UNIX socket."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(TIMEOUT)
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._buffer = b""
        self.packet("qSupported:xmlRegisters=i386")
        # QEMU accepts register writes only after the target description was read.
        self.registers = self._register_layout()

    def packet(self, data: str) -> str:
        checksum = sum(data.encode()) & 0xFF
        self._sock.sendall(b"$" + data.encode() + b"#%02x" % checksum)
        while True:
            start = self._buffer.find(b"$")
            end = self._buffer.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self._buffer) >= end + 3:
                body = self._buffer[start + 1 : end].decode()
                self._buffer = self._buffer[end + 3 :]
                self._sock.sendall(b"+")
                return body
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError("QEMU closed the GDB connection")
            self._buffer += chunk

    def _xfer(self, annex: str) -> str:
        text, offset = "", 0
        while True:
            reply = self.packet(f"qXfer:features:read:{annex}:{offset:x},800")
            text += reply[1:]
            offset += len(reply) - 1
            if reply[:1] == "l":
                return text

    def _register_layout(self) -> dict[str, tuple[int, int]]:
        """Register name -> (number, bytes), in the order the target description lists them."""
        target = self._xfer("target.xml")
        text = "".join(self._xfer(inc) for inc in re.findall(r'href="([^"]+)"', target))
        text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
        regs = re.findall(r'<reg name="([^"]+)" bitsize="(\d+)"', text)
        return {name: (i, int(bits) // 8) for i, (name, bits) in enumerate(regs)}

    def read_register(self, name: str) -> int:
        number, _ = self.registers[name]
        return int.from_bytes(bytes.fromhex(self.packet(f"p{number:x}")), "little")

    def write_register(self, name: str, value: int) -> None:
        number, size = self.registers[name]
        reply = self.packet(f"P{number:x}=" + value.to_bytes(size, "little").hex())
        assert reply == "OK", f"writing {name}: {reply!r}"

    def read_memory(self, address: int, size: int) -> bytes:
        reply = self.packet(f"m{address:x},{size:x}")
        assert not reply.startswith("E"), f"reading {address:#x}: {reply}"
        return bytes.fromhex(reply)

    def run_to(self, address: int) -> None:
        """Continue until RIP is ``address`` (stepping off a breakpoint at RIP first)."""
        if self.read_register("rip") == address:
            assert self.packet("s").startswith("T05")
        assert self.packet(f"Z0,{address:x},1") == "OK"
        try:
            reply = self.packet("c")
        finally:
            self.packet(f"z0,{address:x},1")
        assert reply.startswith("T05"), reply
        assert self.read_register("rip") == address

    def close(self) -> None:
        self._sock.close()


def assemble_stub(doc: dict, workdir: Path) -> bytes:
    """Load GDTR, IDTR, TR and the syscall MSRs, then iretq to the snapshot's ring-3 state."""
    cpu = doc["cpu"]
    regs = {k: int(v, 16) for k, v in cpu["regs"].items()}
    msrs = {k: int(v, 16) for k, v in cpu["msrs"].items()}
    lines = [
        ".intel_syntax noprefix",
        ".text",
        "lgdt [rip + gdtr]",
        "lidt [rip + idtr]",
        f"mov ax, {int(cpu['tr']['selector'], 16)}",
        "ltr ax",
    ]
    for name, number in STUB_MSRS:
        if name in msrs:
            value = msrs[name]
            lines += [f"mov ecx, {number}", f"mov eax, {value & 0xFFFFFFFF}",
                      f"mov edx, {value >> 32}", "wrmsr"]  # fmt: skip
    lines += [
        f"push {int(cpu['segments']['ss']['selector'], 16)}",
        f"movabs rax, {regs['rsp']}",
        "push rax",
        f"push {regs['rflags']}",
        f"push {int(cpu['segments']['cs']['selector'], 16)}",
        f"movabs rax, {regs['rip']}",
        "push rax",
    ]
    lines += [f"movabs {r}, {regs.get(r, 0)}" for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")]
    lines += ["iretq", ".balign 8"]
    for name in ("gdtr", "idtr"):
        table = cpu[name]
        lines += [f"{name}: .word {int(table['limit'], 16)}", f".quad {int(table['base'], 16)}"]
    (workdir / "stub.S").write_text("\n".join(lines) + "\n")
    subprocess.run(["as", "--64", "-o", "stub.o", "stub.S"], check=True, cwd=workdir)
    subprocess.run(
        ["ld", "-Ttext", hex(STUB_VA), "-e", hex(STUB_VA), "--build-id=none", "-nostdlib",
         "-o", "stub.elf", "stub.o"],
        check=True, cwd=workdir,
    )  # fmt: skip
    subprocess.run(["objcopy", "-O", "binary", "stub.elf", "stub.bin"], check=True, cwd=workdir)
    return (workdir / "stub.bin").read_bytes()


def qemu_document(name: str, workdir: Path) -> dict:
    """The fixture's snapshot plus the boot stub and a linear-0 alias of the GDT."""
    doc = json.loads((TRAPS / f"{name}.json").read_text())
    stub = assemble_stub(doc, workdir)
    gdt_pa = int(doc["build"]["gdt"]["phys"], 16)
    doc["memory"].append(
        {"base": hex(STUB_PA), "size": hex(PAGE), "kind": "inline", "data": stub.hex()}
    )
    doc["memory"].sort(key=lambda r: int(r["base"], 16))
    doc["build"]["page_tables"]["mappings"] += [
        {"va": "0x0", "pa": hex(gdt_pa), "size": hex(PAGE), "flags": ["RW", "XD"]},
        {"va": hex(STUB_VA), "pa": hex(STUB_PA), "size": hex(PAGE), "flags": ["RW"]},
    ]
    return doc


@contextmanager
def qemu_at_entry(name: str, workdir: Path) -> Iterator[GdbRemote]:
    """QEMU halted at the fixture's ring-3 entry (after the boot stub ran)."""
    doc = qemu_document(name, workdir)
    ctx = KernelContext.from_snapshot(parse_snapshot(doc))
    loaders = []
    try:
        for i, (base, size) in enumerate(ctx.mem.contiguous_ranges()):
            blob = workdir / f"ram{i}.bin"
            blob.write_bytes(ctx.mem.read(base, size))
            loaders += ["-device", f"loader,file={blob},addr={base:#x},force-raw=on"]
    finally:
        ctx.close()
    sock = workdir / "gdb.sock"
    command = [
        "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-m", "64M",
        "-nographic", "-nodefaults", "-monitor", "none", "-S",
        "-chardev", f"socket,id=gdb,path={sock},server=on,wait=off", "-gdb", "chardev:gdb",
        *loaders,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    gdb = None
    try:
        gdb = GdbRemote(sock)
        cpu = doc["cpu"]
        for reg, value in (
            ("cr4", cpu["cr4"]),
            ("efer", cpu["msrs"]["efer"]),
            ("cr3", cpu["cr3"]),
            ("cr0", cpu["cr0"]),
        ):
            gdb.write_register(reg, int(value, 16))
        kernel_cs = (int(cpu["msrs"]["star"], 16) >> 32) & 0xFFFF
        kernel_ss = kernel_cs + 8  # SDM vol. 2B SYSCALL: SS = STAR[47:32] + 8
        gdb.write_register("cs", kernel_cs)
        gdb.write_register("ss", kernel_ss)
        gdb.write_register("rsp", STUB_VA + PAGE)
        gdb.write_register("eflags", 0x2)
        gdb.write_register("rip", STUB_VA)
        gdb.run_to(int(cpu["regs"]["rip"], 16))
        assert gdb.read_register("cs") & 3 == 3
        yield gdb
    finally:
        if gdb is not None:
            gdb.close()
        process.kill()
        process.wait()


@dataclass(frozen=True)
class HandlerEntry:
    """What a handler sees on entry: the stack pointer, the frame above it, CR2, registers."""

    rsp: int
    frame: tuple[int, ...]
    cr2: int
    regs: dict[str, int]


FRAME_REGS = ("rip", "rsp", "rflags", "cs", "ss", "rcx", "r11")


def qemu_entries(gdb: GdbRemote, handler: int, hits: int, words: int) -> list[HandlerEntry]:
    out = []
    for _ in range(hits):
        gdb.run_to(handler)
        rsp = gdb.read_register("rsp")
        frame = struct.unpack(f"<{words}Q", gdb.read_memory(rsp, 8 * words)) if words else ()
        regs = {r: gdb.read_register("eflags" if r == "rflags" else r) for r in FRAME_REGS}
        out.append(HandlerEntry(rsp, frame, gdb.read_register("cr2"), regs))
    return out


def our_entries(name: str, handler: int, hits: int, words: int) -> list[HandlerEntry]:
    ctx = open_context(TRAPS / f"{name}.json")
    try:
        dbg = Debugger(Machine.from_context(ctx))
        m = dbg.machine
        out = []
        for _ in range(hits):
            enter_handler(dbg, handler)
            rsp = m.reg_read("rsp")
            frame = struct.unpack(f"<{words}Q", dbg.read_virtual(rsp, 8 * words)) if words else ()
            regs = {r: m.reg_read(r) for r in FRAME_REGS}
            out.append(HandlerEntry(rsp, frame, m.reg_read("cr2"), regs))
        return out
    finally:
        ctx.close()


def without_rf(entry: HandlerEntry, words: int) -> HandlerEntry:
    """The entry with RF cleared in the pushed RFLAGS (QEMU 7.2 never sets it)."""
    frame = list(entry.frame)
    if words:
        frame[words - 3] &= ~RF  # RFLAGS is the third quadword from the top of the frame
    return HandlerEntry(entry.rsp, tuple(frame), entry.cr2, entry.regs)


@pytest.mark.parametrize(
    ("name", "handler", "hits", "words"),
    [
        ("int3", "bp_handler", 3, 5),
        ("pagefault", "pf_handler", 2, 6),
        ("doublefault", "df_handler", 1, 6),
        ("syscall", "syscall_entry", 2, 0),
    ],
)
def test_handler_entry_matches_qemu(
    tmp_path: Path, name: str, handler: str, hits: int, words: int
) -> None:
    address = symbols(name)[handler]
    ours = our_entries(name, address, hits, words)
    with qemu_at_entry(name, tmp_path) as gdb:
        theirs = qemu_entries(gdb, address, hits, words)
    assert [without_rf(e, words) for e in ours] == [without_rf(e, words) for e in theirs]
    # Sanity: the comparison saw real frames (RSP in the kernel, CS the kernel's).
    assert all(e.regs["cs"] == 0x10 and e.regs["rip"] == address for e in theirs)
