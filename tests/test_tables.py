"""GDT/IDT/TSS: materialized bytes checked against the SDM layouts, decoded back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kctx_debug.cli import demo_snapshot_path
from kctx_debug.errors import SnapshotError
from kctx_debug.pagetables.context import KernelContext, open_context
from kctx_debug.snapshot import Segment
from kctx_debug.snapshot_io import parse_snapshot
from kctx_debug.tables import decode_gdt, decode_idt, decode_tss

# Hand-encoded from SDM vol. 3A Figure 3-8 (segment descriptor); these are also
# the values Linux puts in its GDT (__KERNEL_CS, __KERNEL_DS, __USER32_CS, ...).
EXPECTED_GDT = {
    2: bytes.fromhex("ffff0000009baf00"),  # 64-bit code, DPL0
    3: bytes.fromhex("ffff00000093cf00"),  # data, DPL0
    4: bytes.fromhex("ffff000000fbcf00"),  # 32-bit code, DPL3
    5: bytes.fromhex("ffff000000f3cf00"),  # data, DPL3
    6: bytes.fromhex("ffff000000fbaf00"),  # 64-bit code, DPL3
}
# Figure 7-4: 16-byte TSS descriptor, base 0xfffffe0000003000, limit 0x67, type 9, P.
EXPECTED_TSS_DESC = bytes.fromhex("670000300089000000feffff00000000")
# Figure 6-8: 64-bit interrupt gate, offset 0xffffffff81000000, selector 0x10, DPL3, P.
EXPECTED_BP_GATE = bytes.fromhex("0000100000ee0081ffffffff00000000")


@pytest.fixture
def demo():
    ctx = open_context(demo_snapshot_path())
    yield ctx
    ctx.close()


def test_materialized_gdt_bytes_match_sdm_layout(demo):
    gdt = 0x1000
    for index, raw in EXPECTED_GDT.items():
        assert demo.mem.read(gdt + 8 * index, 8) == raw, f"GDT[{index}]"
    assert demo.mem.read(gdt + 8 * 8, 16) == EXPECTED_TSS_DESC


def test_materialized_gate_bytes(demo):
    assert demo.mem.read(0x2000 + 16 * 3, 16) == EXPECTED_BP_GATE


def test_materialized_tss_fields_at_sdm_offsets(demo):
    # Figure 7-11: RSP0 at byte 4, IST1 at byte 0x24, I/O map base at 0x66.
    assert demo.mem.read_u64(0x3000 + 0x4) == 0xFFFFC90000004000
    assert demo.mem.read_u64(0x3000 + 0x24) == 0xFFFFC90000008000
    assert demo.mem.read_u16(0x3000 + 0x66) == 104


def test_decode_through_page_tables(demo):
    gdt = {e.index: e.descriptor for e in decode_gdt(demo.mem, demo.cpu, demo.virt_to_phys)}
    assert str(gdt[2]) == "code64 DPL0 P base=0x0 limit=0xfffff G L"
    assert str(gdt[6]) == "code64 DPL3 P base=0x0 limit=0xfffff G L"
    assert gdt[8].base == 0xFFFFFE0000003000 and gdt[8].is_tss
    assert gdt[9] is None  # upper half of the TSS descriptor
    assert len(gdt) == 16  # GDTR limit 0x7f

    idt = decode_idt(demo.mem, demo.cpu, demo.virt_to_phys)
    assert len(idt) == 256  # IDTR limit 0xfff
    bp = idt[3].gate
    assert (bp.offset, bp.selector, bp.dpl, bp.p, bp.is_interrupt_gate) == (
        demo.symbols.address("bp_handler"), 0x10, 3, True, True,
    )  # fmt: skip
    assert idt[8].gate.ist == 1
    assert not idt[32].gate.p

    tss = decode_tss(demo.mem, demo.cpu, demo.virt_to_phys)
    assert tss.rsp0 == 0xFFFFC90000004000
    assert tss.ist[0] == 0xFFFFC90000008000


def test_tss_found_through_gdt_when_tr_has_no_cached_base(demo):
    cpu = replace(demo.cpu, tr=Segment(0x40))
    tss = decode_tss(demo.mem, cpu, demo.virt_to_phys)
    assert tss.rsp0 == 0xFFFFC90000004000


def test_unmapped_table_is_reported(demo):
    cpu = replace(demo.cpu, idtr=replace(demo.cpu.idtr, base=0xFFFF900000000000))
    with pytest.raises(SnapshotError, match=r"cpu\.idtr: table at 0xffff900000000000"):
        decode_idt(demo.mem, cpu, demo.virt_to_phys)


def _demo_doc() -> dict:
    return json.loads(demo_snapshot_path().read_text())


def _open_doc(doc: dict) -> KernelContext:
    return KernelContext.from_snapshot(parse_snapshot(doc, origin=demo_snapshot_path()))


def test_gdtr_limit_beyond_memory():
    doc = _demo_doc()
    doc["cpu"]["gdtr"]["limit"] = "0xffff"  # the GDT's frames stop at 0x4000
    with pytest.raises(SnapshotError, match=r"^cpu\.gdtr\.limit: 0xffff reaches beyond"):
        _open_doc(doc)


def test_gate_with_noncanonical_handler():
    doc = _demo_doc()
    doc["build"]["idt"]["gates"][5]["handler"] = "0x800000000000"
    with pytest.raises(
        SnapshotError, match=r"^build\.idt\.gates\[5\]\.handler: 0x800000000000 is not canonical"
    ):
        _open_doc(doc)


def test_tss_limit_field_out_of_range():
    doc = _demo_doc()
    doc["build"]["gdt"]["entries"][6]["base"] = "0x1" + "0" * 16  # 2**64
    with pytest.raises(SnapshotError, match=r"build\.gdt\.entries\[6\]\.base"):
        _open_doc(doc)
