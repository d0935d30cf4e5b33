"""Costs read from a compiled XLA program's HLO text (no compiler needed): bytes of shapes,
bytes through each kind of collective, and the loop-weighted matmul FLOPs and HBM bytes that
correct the compiler's cost analysis (which counts each loop body once).

Pure text parsing: `collective_bytes`, `loop_counts` (→ `LoopCounts.correct`), `hlo_op_dtypes`,
`shape_bytes`. Loop trip counts are the compiler's `known_trip_count`, else the bound read
from the loop condition; nested loops multiply.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO shape string such as `bf16[8,128]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in _DTYPE_BYTES:
            continue
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    op: str
    rest: str


def _parse_hlo(hlo_text: str) -> tuple[dict[str, list[_Instr]], str | None]:
    """{computation name: instructions} and the entry computation's name."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m and not line[:1].isspace() and not line.startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append(_Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def _trip_count(ins: _Instr, comps: Mapping[str, list[_Instr]]) -> int:
    """A while loop's trip count: the compiler's known_trip_count, else the bound `i < N` read
    from its condition (JAX loops count from 0), else 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.rest)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", ins.rest)
    body = comps.get(cond.group(1), []) if cond else []
    constants = {i.name: int(m.group(1)) for i in body
                 for m in [re.match(r"(-?\d+)\)", i.rest)] if i.op == "constant" and m}
    for i in body:
        if i.op == "compare" and "direction=LT" in i.rest:
            for name in re.findall(r"%([\w.\-]+)", i.rest.split(")", 1)[0]):
                if name in constants:
                    return max(1, constants[name])
    return 1


def _multipliers(comps: Mapping[str, list[_Instr]], entry: str | None) -> dict[str, int]:
    """How many times each computation runs per step (while bodies × their known trip count)."""
    mult = {entry: 1} if entry else {}
    order = [entry] if entry else []
    for comp in order:
        for ins in comps.get(comp, []):
            factor = 1
            if ins.op == "while":
                factor = _trip_count(ins, comps)
            for callee in re.findall(r"(?:body|condition|calls|to_apply|branch_computations)="
                                     r"\{?%?([\w.\-]+)", ins.rest):
                if callee in comps and callee not in mult:
                    mult[callee] = mult[comp] * factor
                    order.append(callee)
    return mult


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the operands of each kind of collective per device per step (loops counted)."""
    comps, entry = _parse_hlo(hlo_text)
    mult = _multipliers(comps, entry)
    shapes = {ins.name: ins.shape for instrs in comps.values() for ins in instrs}
    out = dict.fromkeys(COLLECTIVES, 0)
    for comp, instrs in comps.items():
        for ins in instrs:
            kind = ins.op.removesuffix("-start")
            if kind not in out or ins.op.endswith("-done"):
                continue
            args = ins.rest.split(")", 1)[0]
            operands = re.findall(r"%([\w.\-]+)", args)
            size = sum(shape_bytes(shapes.get(o, "")) for o in operands)
            out[kind] += size * mult.get(comp, 1)
    return out


_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
               "copy-start", "copy-done"}


def _dims(shape_text: str) -> list[int]:
    m = _ARRAY.search(shape_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _window(rest: str) -> dict[str, list[int] | list[tuple[int, int]]]:
    """A convolution's window attributes: size, stride, pad, lhs_dilate, rhs_dilate."""
    m = re.search(r"window=\{([^}]*)\}", rest)
    out: dict = {}
    for item in (m.group(1).split() if m else []):
        key, _, value = item.partition("=")
        if key == "pad":
            out[key] = [tuple(int(v) for v in p.split("_")) for p in value.split("x")]
        elif key != "rhs_reversal":
            out[key] = [int(v) for v in value.split("x")]
    return out


def _valid_taps(size: int, out: int, inp: int, stride: int, pad_lo: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """Multiply-adds along one spatial dimension: (output position, kernel tap) pairs that
    land on a real input element (not padding, not a hole of a dilated input)."""
    last = (inp - 1) * lhs_dilate
    return sum(1 for o in range(out) for t in range(size)
               for p in [o * stride - pad_lo + t * rhs_dilate]
               if 0 <= p <= last and p % lhs_dilate == 0)


def _matmul_flops(ins: _Instr, shapes: Mapping[str, str]) -> float:
    """2 × multiply-adds of a dot or convolution, counted exactly: a convolution's window
    taps that fall on padding or on the holes of a dilated input (how the TPU compiler
    writes batched products) do no work and are not counted."""
    operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")", 1)[0])
    out_dims = _dims(ins.shape)
    if ins.op == "convolution" and len(operands) >= 2:
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.rest)
        lhs, kernel = _dims(shapes.get(operands[0], "")), _dims(shapes.get(operands[1], ""))
        if not labels or [len(g) for g in labels.groups()] != [len(lhs), len(kernel),
                                                               len(out_dims)]:
            return 0.0
        lhs_l, ker_l, out_l = labels.groups()
        macs = (out_dims[out_l.index("b")] * out_dims[out_l.index("f")]
                * kernel[ker_l.index("i")])
        win = _window(ins.rest)
        for k, dim in enumerate(c for c in ker_l if c.isdigit()):
            def attr(key, default, k=k):
                values = win.get(key)
                return values[k] if values and k < len(values) else default
            macs *= _valid_taps(kernel[ker_l.index(dim)], out_dims[out_l.index(dim)],
                                lhs[lhs_l.index(dim)], attr("stride", 1),
                                attr("pad", (0, 0))[0], attr("lhs_dilate", 1),
                                attr("rhs_dilate", 1))
        return 2.0 * macs
    if ins.op == "dot" and operands:
        lhs = _dims(shapes.get(operands[0], ""))
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
        idx = [int(i) for i in contracting.group(1).split(",") if i] if contracting else []
        return 2.0 * math.prod(out_dims) * math.prod(lhs[i] for i in idx if i < len(lhs))
    return 0.0


def _operands(ins: _Instr) -> list[str]:
    return re.findall(r"%([\w.\-]+)", ins.rest.split(")", 1)[0])


def _callee(ins: _Instr) -> str:
    m = re.search(r"calls=%?([\w.\-]+)", ins.rest)
    return m.group(1) if m else ""


def _param_names(body: list[_Instr]) -> dict[int, str]:
    return {int(m.group(1)): i.name for i in body if i.op == "parameter"
            for m in [re.match(r"(\d+)", i.rest)] if m}


def _bytes_read(comps: Mapping[str, list[_Instr]], comp: str, param: str, full: int) -> int:
    """Bytes a fused computation reads of its parameter: the slices it dynamic-slices out of
    it (a scanned layer's weights and residuals are slices of stacked arrays), else all."""
    users: dict[str, list[_Instr]] = {}
    for i in comps.get(comp, []):
        for o in _operands(i):
            users.setdefault(o, []).append(i)
    total, todo = 0, [param]
    while todo:
        name = todo.pop()
        for user in users.get(name, []):
            ops = _operands(user)
            if user.op in ("bitcast", "reshape"):
                todo.append(user.name)
            elif user.op == "dynamic-slice" and ops[0] == name:
                total += shape_bytes(user.shape)
            elif user.op == "fusion":  # A nested fusion: what it reads of the operand.
                inner = _param_names(comps.get(_callee(user), []))
                total += sum(_bytes_read(comps, _callee(user), inner[k], full)
                             for k, o in enumerate(ops) if o == name and k in inner)
            else:
                return full
    return min(total, full)


def _fusion_traffic(ins: _Instr, comps: Mapping[str, list[_Instr]],
                    shapes: Mapping[str, str]) -> int:
    """HBM bytes of one fusion: its results, except that an in-place dynamic-update-slice
    writes only its update (and does not read the buffer it updates), plus its operands as
    read (`_bytes_read`)."""
    body = comps.get(_callee(ins), [])
    if not body:
        return shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in
                                            _operands(ins))
    by_name = {i.name: i for i in body}

    def through_bitcasts(name: str) -> _Instr | None:
        while name in by_name and by_name[name].op == "bitcast":
            name = _operands(by_name[name])[0]
        return by_name.get(name)

    root = body[-1]
    results = [by_name[o] for o in _operands(root)] if root.op == "tuple" else [root]
    in_place, written = set(), 0
    for result in results:
        inner = through_bitcasts(result.name)
        if inner is not None and inner.op == "dynamic-update-slice":
            buffer, update = _operands(inner)[:2]
            target = through_bitcasts(buffer)
            if target is not None and target.op == "parameter":
                in_place.add(target.name)
                written += shape_bytes(by_name[update].shape if update in by_name else "")
                continue
        written += shape_bytes(result.shape)
    params = _param_names(body)
    read = 0
    for k, operand in enumerate(_operands(ins)):
        full = shape_bytes(shapes.get(operand, ""))
        if params.get(k) not in in_place:
            read += _bytes_read(comps, _callee(ins), params[k], full) if k in params else full
    return read + written


_CONTROL = {"while", "conditional", "call"}


def _traffic(ins: _Instr, comps: Mapping[str, list[_Instr]], shapes: Mapping[str, str]) -> int:
    """HBM bytes one instruction of a control-flow computation reads and writes (an estimate
    from the HLO text: operands and results, slices of stacked arrays counted as slices)."""
    if ins.op in _NO_TRAFFIC or ins.op in _CONTROL or ins.op.endswith("-done"):
        return 0
    if ins.op == "fusion":
        return _fusion_traffic(ins, comps, shapes)
    operands = _operands(ins)
    if ins.op == "dynamic-slice":
        return 2 * shape_bytes(ins.shape)
    if ins.op == "dynamic-update-slice" and len(operands) > 1:
        return 2 * shape_bytes(shapes.get(operands[1], ""))
    return shape_bytes(ins.shape) + sum(shape_bytes(shapes.get(o, "")) for o in operands)


@dataclasses.dataclass(frozen=True)
class LoopCounts:
    """Counts read from the HLO text, each summed twice: every loop body once (as the
    compiler's cost analysis counts) and weighted by its trip count. Matmul FLOPs (exact),
    elements produced by other arithmetic (a proxy for the compiler's non-matmul FLOPs) and
    HBM bytes (an estimate)."""

    flops_once: float
    flops_weighted: float
    bytes_once: float
    bytes_weighted: float
    other_once: float = 0.0
    other_weighted: float = 0.0

    def correct(self, flops: float, bytes_accessed: float) -> tuple[float, float]:
        """The compiler's counts with every loop body counted once per trip.

        FLOPs: the loop-weighted matmul FLOPs, plus the compiler's other FLOPs (its count
        minus the matmuls seen once) scaled by the weighted ÷ once other-arithmetic
        elements. (One ratio for all FLOPs over-counted by 1.4× where FSDP's windowed
        matmul loops, pure matmul, nest 16 trips in each of 12 layers.) Bytes: the
        compiler's count plus the extra trips' bytes (weighted − once) estimated from the
        HLO; a ratio would also scale the bytes outside loops (the optimizer's update of
        stacked parameters), which counted bytes 44× instead of 12× for a 12-layer scan.
        """
        other = max(flops - self.flops_once, 0.0)
        scale = self.other_weighted / self.other_once if self.other_once else 1.0
        return (self.flops_weighted + other * scale,
                bytes_accessed + self.bytes_weighted - self.bytes_once)


# Ops that move or reshape data but do no arithmetic (not in the non-matmul FLOPs proxy).
_NO_ARITHMETIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "reshape",
                  "broadcast", "transpose", "copy", "copy-start", "copy-done", "slice",
                  "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "iota",
                  "fusion", "while", "call", "conditional", "convolution", "dot", "gather",
                  "scatter", "reverse", "after-all", "partition-id", "replica-id",
                  "opt-barrier", "custom-call", *COLLECTIVES}


def _elements(shape_text: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d)
               for _, dims in _ARRAY.findall(shape_text))


def loop_counts(hlo_text: str) -> LoopCounts:
    """`LoopCounts` of a compiled program's HLO text (`Compiled.as_text()`). Nested loops
    multiply their trip counts (a ring loss's hops inside gradient accumulation)."""
    comps, entry = _parse_hlo(hlo_text)
    mult = _multipliers(comps, entry)
    shapes = {ins.name: ins.shape for instrs in comps.values() for ins in instrs}
    control, order = {entry}, [entry]
    for comp in order:
        for ins in comps.get(comp, []):
            called = re.findall(r"(?:body|condition|branch_computations)=\{?%?([\w.\-]+)",
                                ins.rest)
            if ins.op == "call":
                called += re.findall(r"to_apply=%?([\w.\-]+)", ins.rest)
            for callee in called:
                if callee in comps and callee not in control:
                    control.add(callee)
                    order.append(callee)
    sums = [0.0] * 6
    for comp, instrs in comps.items():
        m = mult.get(comp, 1)
        flops = sum(_matmul_flops(i, shapes) for i in instrs
                    if i.op in ("convolution", "dot"))
        size = sum(_traffic(i, comps, shapes) for i in instrs) if comp in control else 0
        other = sum(_elements(i.shape) for i in instrs
                    if i.op not in _NO_ARITHMETIC and not i.op.endswith(("-start", "-done")))
        for k, value in enumerate((flops, m * flops, size, m * size, other, m * other)):
            sums[k] += value
    return LoopCounts(*sums)


def hlo_op_dtypes(hlo_text: str, op: str) -> list[str]:
    """Element types of the results of every `op` instruction (e.g. "convolution", "dot")."""
    comps, _ = _parse_hlo(hlo_text)
    return [m.group(1) for instrs in comps.values() for ins in instrs if ins.op == op
            for m in [_ARRAY.search(ins.shape)] if m]
