"""Text and JSON renderings of a page walk (:class:`~kctx_debug.pagetables.walk.WalkResult`).

One line per paging-structure entry read, in the style of Bochs' ``page`` command,
then the translation and, for a fault, the exception the processor would raise:

>>> print(render_walk(translate(mem, 0xFFFFFFFF81000000, cpu, Access.parse("write"))))
PML4E[511] @ 0x0000000000001ff8 = 0x0000000000002003  P|RW
PDPTE[510] @ 0x0000000000002ff0 = 0x0000000000003003  P|RW
PDE[8]     @ 0x0000000000003040 = 0x0000000001000081  P|PS
0xffffffff81000000 -> phys 0x0000000001000000 (2M page) r-x supervisor
#PF error code 0x3 (P|WR): write to read-only page (CR0.WP=1) at PDE[8] (entry 0x0000000001000081)
"""

from __future__ import annotations

from typing import Any

from .entry import PfErrorCode
from .walk import Access, PageFault, WalkResult, WalkStep, page_size_name

__all__ = ["describe_error_code", "render_walk", "walk_to_json"]

# Wide enough for the longest step label, "PML4E[511]".
_LABEL_WIDTH = 10


def _label(step: WalkStep) -> str:
    return f"{step.level.name}[{step.index}]"


def describe_error_code(code: int) -> str:
    """``P|WR|US`` for the set bits of a #PF error code; unknown bits as hex; ``-`` for 0."""
    names = [flag.name for flag in PfErrorCode if code & flag and flag.name]
    unknown = code & ~sum(PfErrorCode)
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) if names else "-"


def _render_step(step: WalkStep) -> str:
    return (
        f"{_label(step):<{_LABEL_WIDTH}} @ 0x{step.entry_phys:016x} = 0x{step.raw:016x}  "
        f"{step.flags}"
    )


def _render_translation(result: WalkResult) -> str:
    assert result.phys is not None and result.page_size is not None
    perms = "r" + ("w" if result.writable else "-") + ("x" if result.executable else "-")
    size = page_size_name(result.page_size)
    words = [
        f"0x{result.va:016x} -> phys 0x{result.phys:016x} ({size} page)",
        perms,
        "user" if result.user else "supervisor",
    ]
    if not result.executable:
        words.append("nx")
    if result.pkey is not None:
        words.append(f"pkey {result.pkey}")
    return " ".join(words)


def _render_fault(fault: PageFault) -> str:
    if fault.step is None:  # #GP(0) for a non-canonical address
        return f"#GP(0): {fault.reason}"
    step = fault.step
    return (
        f"#PF error code {int(fault.error_code):#x} ({describe_error_code(fault.error_code)}): "
        f"{fault.reason} at {_label(step)} (entry 0x{step.raw:016x})"
    )


def render_walk(result: WalkResult) -> str:
    """The walk as text: one line per level, the translation, then any fault."""
    lines = [_render_step(step) for step in result.steps]
    if result.missing_frame is not None:
        level = result.steps[-1].level.name if result.steps else "top-level"
        lines.append(
            f"table at 0x{result.missing_frame:016x} (below {level}) is not in the snapshot: "
            f"translation of 0x{result.va:016x} unknown"
        )
    elif result.ok:
        lines.append(_render_translation(result))
    else:
        lines.append(f"0x{result.va:016x} -> no translation")
    if result.fault is not None:
        lines.append(_render_fault(result.fault))
    elif result.access is not None and result.ok:
        lines.append(f"{result.access} access allowed")
    return "\n".join(lines)


def _access_json(access: Access | None) -> dict[str, Any] | None:
    if access is None:
        return None
    return {"kind": access.kind.value, "user": access.user, "implicit": access.implicit}


def _step_json(step: WalkStep) -> dict[str, Any]:
    return {
        "level": step.level.name,
        "table": step.table_phys,
        "index": step.index,
        "entry_address": step.entry_phys,
        "entry": step.raw,
        "leaf": step.leaf,
        "flags": step.flags,
    }


def _fault_json(fault: PageFault | None) -> dict[str, Any] | None:
    if fault is None:
        return None
    return {
        "kind": fault.kind.value,
        "vector": int(fault.vector),
        "error_code": int(fault.error_code),
        "error_bits": describe_error_code(fault.error_code),
        "address": fault.address,
        "level": fault.step.level.name if fault.step else None,
        "index": fault.step.index if fault.step else None,
        "entry": fault.step.raw if fault.step else None,
        "reason": fault.reason,
    }


def walk_to_json(result: WalkResult) -> dict[str, Any]:
    """The walk as a JSON-ready dict; addresses and entries are plain integers."""
    return {
        "va": result.va,
        "status": result.status.value,
        "ok": result.ok,
        "phys": result.phys,
        "page_size": result.page_size,
        "writable": result.writable,
        "user": result.user,
        "executable": result.executable,
        "pkey": result.pkey,
        "access": _access_json(result.access),
        "steps": [_step_json(step) for step in result.steps],
        "fault": _fault_json(result.fault),
        "missing_frame": result.missing_frame,
    }
