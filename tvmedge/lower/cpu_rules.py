"""Rule-based CPU schedules for Relax's fused kernels: tvmedge's untuned default.

Relax's CPU build leaves every kernel a naive loop nest (no threads, no SIMD); dlight's CPU
rules cover only GEMV and reductions. These rules, in dlight's form (``ScheduleRule``
subclasses applied with ``dl.ApplyDefaultSchedule``), cover what CNNs are made of, on
NHWC graphs (``tvmedge.lower.pipeline`` converts the layout first):

- :class:`SpatialReduction` — one reduction block with its prologue (padding) and epilogue
  (bias, activation, residual add): conv2d of every kind (dense, depthwise, grouped),
  dense/matmul, pooling, mean. The output's innermost axis (channels in NHWC, columns of a
  matmul) is split into SIMD vectors, the axis before it into a register tile, the
  accumulators live in registers across the whole reduction, the epilogue runs on the tile
  while it is hot, and the outer loops run on the thread pool.
- :class:`Injective` — layout transforms, padding, resize, concat, elementwise chains:
  inlined into one loop nest, outer loops parallel, innermost axis vectorized.
- :class:`Parallel` — the fallback for whatever is left: every block's outer loops
  parallel, so no kernel runs as a single-threaded naive loop nest.

Vector width comes from LLVM's view of the target (AVX-512: 16 fp32 lanes, AVX2: 8,
NEON: 4), thread count from the target's ``num-cores``. Numerics change only by float
reassociation (tiling and vector accumulation order).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

_ACCUMULATOR_REGISTERS = 24  # of 32 vector registers (AVX-512, AArch64); the rest hold operands
_INLINE_PAD_MAX_REDUCTION = 64  # reduction sizes (kh*kw*cin/groups) up to which padding is inlined
_PACK_MIN_BYTES = 64 << 10  # weights from this size on are packed per vector tile (see _pack_weight)


def vector_bits(target: Target) -> int:
    """The SIMD register width the target's features give (``llvm_get_vector_width`` answers
    512 for any x86 CPU on an AVX-512 host, so the features are read instead)."""
    from ..isa import cpu_arch, cpu_features

    arch, feats = cpu_arch(target), cpu_features(target)
    if arch == "x86_64":
        return 512 if "avx512f" in feats else 256 if "avx" in feats else 128
    if arch == "riscv64" and "v" in feats:
        return 128  # RVV's minimum VLEN; wider cores still run 128-bit code correctly
    return 128  # NEON, and scalar targets (LLVM splits the vectors)


def _is_rvv(target: Target) -> bool:
    from ..isa import cpu_arch, cpu_features

    return cpu_arch(target) == "riscv64" and "v" in cpu_features(target)


def vector_lanes(target: Target, bits: int = 32) -> int:
    """SIMD lanes for ``bits``-wide elements on ``target`` (at least 4)."""
    return max(vector_bits(target) // bits, 4)


def num_cores(target: Target) -> int:
    return max(int(target.attrs.get("num-cores", 1) or 1), 1)


def _start(func, target: Target) -> tuple[s_tir.Schedule | None, list | None]:
    """A schedule of ``func`` and its blocks in dlight's normal form; (None, None) when the
    rule cannot apply (not a PrimFunc, not a CPU target, not normalizable)."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None, None
    sch = s_tir.Schedule(func)
    return sch, normalize_prim_func(sch)


def _int(expr) -> int | None:
    return int(expr) if isinstance(expr, (int, tirx.IntImm)) else None


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(min(n, at_most), 1) + 1) if n % d == 0)


def _group_width(block, var) -> int | None:
    """The smallest ``g > 1`` with ``var // g`` in a read index of ``block`` (grouped conv's
    input channel), else None."""
    found: list[int] = []

    def walk(e) -> None:
        if isinstance(e, tirx.FloorDiv) and _int(e.b) is not None and _int(e.b) > 1 and _uses(e.a, var):
            found.append(_int(e.b))
        for child in ("a", "b", "value"):
            sub = getattr(e, child, None)
            if isinstance(sub, tvm.ir.expr.Expr) and not isinstance(sub, (tirx.IntImm, tirx.Var)):
                walk(sub)

    for region in block.reads:
        for r in region.region:
            walk(r.min)
    return min(found) if found else None


def _uses(e, var) -> bool:
    if isinstance(e, tirx.Var):
        return e.same_as(var)
    return any(_uses(getattr(e, c), var) for c in ("a", "b", "value")
               if isinstance(getattr(e, c, None), tvm.ir.expr.Expr))


def _numel(sch: s_tir.Schedule, block) -> int | None:
    """Elements of the (first) buffer ``block`` writes; None when not static."""
    writes = sch.get(block).writes
    if not writes:
        return None
    n = 1
    for d in writes[0].source.shape:
        d = _int(d)
        if d is None:
            return None
        n *= d
    return n


def _vector_factor(extent: int, lanes: int, max_vectors: int = 2) -> int:
    """The vector tile of an axis: the largest divisor of ``extent`` made of up to ``max_vectors``
    whole vectors; else one half or quarter vector (at least 4 lanes). Several partial vectors
    side by side (24 = 1.5 AVX-512 vectors, a GEMV's 40 = 2.5) made LLVM re-pack the
    accumulators lane by lane every step: 2-5x slower than one partial vector."""
    for k in range(max_vectors, 0, -1):
        if extent % (lanes * k) == 0:
            return lanes * k
    for f in (lanes // 2, lanes // 4):
        if f >= 4 and extent % f == 0:
            return f
    return 1


def _parallel(sch: s_tir.Schedule, loops: list, target: Target) -> None:
    """Fuse the leading loops until there is enough work for the threads; mark it parallel."""
    if not loops:
        return
    want = num_cores(target) * 8
    take, work = 0, 1
    for loop in loops:
        extent = _int(sch.get(loop).extent)
        if extent is None:
            break
        take, work = take + 1, work * extent
        if work >= want:
            break
    if take == 0 or work == 1:
        return
    fused = sch.fuse(*loops[:take]) if take > 1 else loops[0]
    if num_cores(target) > 1:
        sch.parallel(fused)


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int) -> list:
    """Vectorize the block's innermost loop (split to a lane multiple if it is long); the outer loops."""
    loops = sch.get_loops(block)
    extent = _int(sch.get(loops[-1]).extent)
    if extent is None or extent == 1:
        return loops
    if extent <= 4 * lanes:
        if extent >= 4:
            sch.vectorize(loops[-1])
        return loops[:-1]
    factor = _vector_factor(extent, lanes)
    if factor == 1:
        return loops[:-1]
    outer, inner = sch.split(loops[-1], [None, factor])
    sch.vectorize(inner)
    return loops[:-1] + [outer]


def _pack_weight(sch: s_tir.Schedule, func: tirx.PrimFunc, block, vec_var, fv: int) -> bool:
    """Pack a layout-free weight (a constant: Relax folds the packing at compile time) so that
    each vector tile of output channels reads one contiguous slab: ``[..., co]`` becomes
    ``[co // fv, ..., co % fv]``. In NHWC's HWIO layout consecutive reduction steps of one
    tile are ``Cout * 4`` bytes apart: for resnet18's 512-channel 3x3 convs that is one page
    every two steps, and the kernel ran 4x slower than packed (TLB and prefetch misses).
    MetaSchedule's layout-rewrite annotation lets ``SplitLayoutRewritePreproc`` move the copy
    out of the kernel. Returns whether it packed."""
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    if not free or fv < 4:
        return False
    params = [func.params[int(i)] for i in free]
    stmt = sch.get(block)
    for k, region in enumerate(stmt.reads):
        buf = region.source
        if not any(buf.same_as(p) for p in params):
            continue
        idx = [r.min for r in region.region]
        shape = [_int(d) for d in buf.shape]
        if (len(idx) < 2 or any(d is None for d in shape) or not isinstance(idx[-1], tirx.Var)
                or not idx[-1].same_as(vec_var) or any(_uses(e, vec_var) for e in idx[:-1])):
            continue
        nbytes = buf.dtype.bits // 8
        for d in shape:
            nbytes *= d
        if shape[-1] % fv or shape[-1] == fv or nbytes < _PACK_MIN_BYTES:
            return False
        cached = sch.cache_read(block, k, "global")
        sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
        n = len(shape)
        sch.transform_layout(block, ("read", k), tirx.IndexMap.from_func(
            lambda *ax: [ax[-1] // fv, *ax[:-1], ax[-1] % fv], ndim=n))
        return True
    return False


def _schedule_spatial(sch: s_tir.Schedule, block, target: Target) -> None:
    outer = _vectorize_inner(sch, block, vector_lanes(target))
    _parallel(sch, outer, target)


def _inline_all(sch: s_tir.Schedule) -> None:
    """Inline spatial blocks into their consumers (or producer) until none can be; blocks
    annotated ``tvmedge.materialize`` (``lower.resize``'s first stage) are not inlined."""
    from .resize import MATERIALIZE

    progress = True
    while progress:
        progress = False
        for block in sch.get_child_blocks(_root(sch)):
            keep = MATERIALIZE in sch.get(block).annotations
            for inline in (() if keep else (sch.compute_inline,)) + (sch.reverse_compute_inline,):
                try:
                    inline(block)
                    progress = True
                    break
                except Exception:  # noqa: BLE001 - "cannot inline" is the normal answer
                    continue
            if progress:
                break


def _root(sch: s_tir.Schedule):
    from tvm.s_tir.dlight.analysis import get_root_block

    return get_root_block(sch)


class Injective(ScheduleRule):
    """Functions of spatial blocks only: inline into as few loop nests as possible, then parallel + SIMD."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):  # noqa: D102
        sch, infos = _start(func, target)
        if infos is None or not all(i.is_injective() for i in infos):
            return None
        _inline_all(sch)
        for block in sch.get_child_blocks(_root(sch)):
            _schedule_spatial(sch, block, target)
        return sch


class Parallel(ScheduleRule):
    """The fallback: every top-level block's leading spatial loops on the thread pool."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):  # noqa: D102
        sch, infos = _start(func, target)
        if infos is None:
            return None
        for info in infos:
            spatial = []
            for it in info.iters:
                if it.kind != "S":
                    break
                spatial.append(it.loop_rv)
            _parallel(sch, spatial, target)
        return sch


class WinogradTransform(ScheduleRule):
    """Winograd's input and output transforms (``tvmedge.lower.winograd``): per tile and
    vector of channels, the tile positions unrolled (their selects fold to the non-zero
    terms), the first stage in registers, the conv's epilogue inlined into the last."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):  # noqa: D102
        from .winograd import IN_BLOCKS, OUT_BLOCKS

        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(_root(sch))
        names = [sch.get(b).name_hint for b in blocks]
        lanes = vector_lanes(target)
        if names and names[0].startswith(IN_BLOCKS[0]) and len(names) == 2:
            first, last = blocks
            i, p, c = sch.get_loops(last)
            fv = _vector_factor(_int(sch.get(c).extent), lanes, 1)
            co, ci = sch.split(c, [None, fv])
            sch.reorder(p, co, i, ci)
            _parallel(sch, [p, co], target)
            sch.unroll(i)
        elif names and names[0].startswith(OUT_BLOCKS[0]) and len(names) >= 2:
            first, rest = blocks[0], blocks[1:]
            size = _numel(sch, rest[0])
            if size is None or any(_numel(sch, b) != size for b in rest):
                return None  # an epilogue that broadcasts: not ours
            for b in rest[:-1]:
                sch.compute_inline(b)
            last = rest[-1]
            loops = sch.get_loops(last)
            if len(loops) != 4:
                return None
            m = math.isqrt(_int(sch.get(sch.get_loops(first)[0]).extent) + 1) - 1  # the extent is (m + 2) * m
            n, h, w, c = loops
            ho, hi = sch.split(h, [None, m])
            wo, wi = sch.split(w, [None, m])
            fv = _vector_factor(_int(sch.get(c).extent), lanes, 1)
            co, ci = sch.split(c, [None, fv])
            sch.reorder(n, ho, wo, co, hi, wi, ci)
            _parallel(sch, [n, ho, wo], target)
            sch.unroll(hi)
            sch.unroll(wi)
        else:
            return None
        if fv >= 4:
            sch.vectorize(ci)
        # the first stage: computed per tile and channel vector into a local buffer
        sch.compute_at(first, co)
        sch.set_scope(first, 0, "local")
        depth = next(k for k, lp in enumerate(sch.get_loops(last)) if sch.get(lp).same_as(sch.get(co))) + 1
        inner = sch.get_loops(first)[depth:]
        for lp in inner[:-1]:
            sch.unroll(lp)
        if fv >= 4:
            sch.vectorize(inner[-1])
        return sch


class SpatialReduction(ScheduleRule):
    """One reduction block (conv2d, matmul, pooling, mean) with its prologue and epilogue."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):  # noqa: D102
        sch, infos = _start(func, target)
        if infos is None:
            return None
        reductions = [i for i in infos if i.is_reduction()]
        if len(reductions) != 1 or any(not i.is_injective() for i in infos if i is not reductions[0]):
            return None
        red = reductions[0]
        kinds = red.dom_kind()
        if "O" in kinds or "R" not in kinds:
            return None
        order = [i.block_rv for i in infos]
        pos = next(k for k, i in enumerate(infos) if i is red)
        prologue, epilogue = order[:pos], order[pos + 1:]
        lanes = vector_lanes(target)

        # Prologue: pure copies and elementwise producers go into the reduction; padding
        # (a conditional) stays a separate, parallel and vectorized stage.
        from tvm import get_global_func

        has_if = get_global_func("s_tir.schedule.HasIfThenElse")
        # Padding is inlined too where each input element is used only a few times
        # (depthwise conv, pooling): there a separate pass over the padded copy costs more
        # than the bounds checks.
        # RVV: TVM 0.27 cannot lower a vectorized loop over an inlined pad whose value is
        # the same in every lane (a conv with one input channel: ComputeLegalizer's
        # "MatchType" check fails), so on RVV targets padding always stays a stage of its own.
        inline_pad_max = 0 if _is_rvv(target) else _INLINE_PAD_MAX_REDUCTION
        reduce_extent = 1
        for it in red.iters:
            if it.kind == "R":
                reduce_extent *= _int(it.dom) or 1 << 20
        kept = []
        for block in reversed(prologue):
            if has_if(sch.get(block)) and reduce_extent > inline_pad_max:
                kept.append(block)
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001
                kept.append(block)
        # A broadcasting epilogue (squeeze-excitation: sigmoid(conv(pooled)) * x) writes more
        # than the reduction: inlined, it would redo the per-channel part (a sigmoid) for
        # every pixel. The blocks of the reduction's size stay the epilogue; the rest become
        # one spatial stage of their own.
        size = _numel(sch, red.block_rv)
        n_small = next((k for k, b in enumerate(epilogue) if _numel(sch, b) != size), len(epilogue))
        broadcast = epilogue[n_small:]
        epilogue = epilogue[:n_small]
        if broadcast and any(_numel(sch, b) is None for b in broadcast):
            return None
        for block in broadcast[:-1]:
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001
                return None
        # Epilogue: one block that reads the accumulator tile.
        for block in epilogue[:-1]:
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001
                return None
        block = red.block_rv
        # The accumulator tile is a local buffer, so LLVM keeps it in registers.
        if epilogue:
            tail = epilogue[-1]
            sch.set_scope(block, 0, "local")
        else:
            tail = sch.cache_write(block, 0, "local")

        stmt = sch.get(block)
        iters = list(stmt.iter_vars)
        loops = sch.get_loops(block)
        if len(loops) != len(iters):
            return None
        extents = [_int(sch.get(lp).extent) for lp in loops]
        if any(e is None for e in extents):
            return None
        spatial = [k for k, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.DataPar]
        reduce_ = [k for k, iv in enumerate(iters) if iv.iter_type == tirx.IterVar.CommReduce]
        if spatial != list(range(len(spatial))):
            return None

        # The vector axis: the spatial iterator that indexes the output's innermost dimension.
        out_index = stmt.writes[0].region[-1].min if stmt.writes[0].region else None
        vec = next((k for k in spatial if out_index is not None and iters[k].var.same_as(out_index)), None)
        # The register axis: the nearest spatial axis before it with more than one iteration.
        reg = next((k for k in reversed(spatial) if k != vec and extents[k] > 1 and (vec is None or k < vec)), None)
        # Without one (a matrix-vector product), the vector tile alone holds the accumulators.
        fv = _vector_factor(extents[vec], lanes, 2 if reg is not None else 8) if vec is not None else 1
        if fv == 1 and vec is not None and 4 <= extents[vec] < lanes:
            fv = extents[vec]
        # Grouped conv: the input channel read is (c // g) * g + r, the same element for g
        # output channels only. A vector wider than g would gather (LLVM scalarizes it:
        # RegNet's 8-wide groups ran at ~3 GFLOP/s); within g lanes it is one broadcast.
        g = _group_width(stmt, iters[vec].var) if vec is not None else None
        if g is not None and fv > g:
            fv = _vector_factor(g, lanes, 1) if g >= 4 else 1
        packed = vec is not None and _pack_weight(sch, func, block, iters[vec].var, fv)
        budget = max(_ACCUMULATOR_REGISTERS // max(fv // lanes, 1), 1)
        fr = _largest_divisor(extents[reg], min(budget, 8)) if reg is not None else 1

        tiles_o, tiles_i = {}, {}
        for k, f in ((vec, fv), (reg, fr)):
            if k is None:
                continue
            if f > 1 and f < extents[k]:
                tiles_o[k], tiles_i[k] = sch.split(loops[k], [None, f])
            elif f > 1:
                tiles_i[k] = loops[k]
            else:
                tiles_o[k] = loops[k]
        plain = [loops[k] for k in spatial if k not in (vec, reg)]
        vec_tiles = [tiles_o[vec]] if vec in tiles_o else []
        # Each vector tile of output channels reads its own slab of packed weights: with the
        # tiles outermost a slab stays in L2 while every output row uses it. Tiles inside the
        # rows streamed all the weights from memory once per row (resnet18's 7x7x512 convs: 2x slower).
        outer = vec_tiles + plain if packed else plain + vec_tiles
        inner = [tiles_i[k] for k in (reg, vec) if k in tiles_i]
        sch.reorder(*outer, *([tiles_o[reg]] if reg in tiles_o else []), *[loops[k] for k in reduce_], *inner)
        # Parallel over the outer loops (the vector tiles too when the rest are too few).
        _parallel(sch, outer, target)
        # The epilogue runs under the loop just outside the reduction: on the hot tile.
        anchor_loops = sch.get_loops(block)
        n_below = len(reduce_) + len(inner)
        anchor = anchor_loops[len(anchor_loops) - n_below - 1] if len(anchor_loops) > n_below else None

        if vec in tiles_i and fv > lanes and reg is None:
            # Several vectors with no register axis (a matrix-vector product): one unrolled
            # vector op each. A loop of fv lanes vectorized whole is one LLVM vector of fv
            # lanes, which LLVM re-packs every step unless fv is a power of two: SE blocks'
            # 960x240 product ran 10x slower as one 80-lane vector than as 5 x 16.
            unroll_, tiles_i[vec] = sch.split(tiles_i[vec], [None, lanes])
            sch.unroll(unroll_)
            n_below += 1
        if vec in tiles_i and fv >= 4:
            sch.vectorize(tiles_i[vec])
        if reg in tiles_i and fr > 1:
            sch.unroll(tiles_i[reg])
        init = sch.decompose_reduction(block, sch.get_loops(block)[-n_below])
        init_loops = sch.get_loops(init)
        if fv >= 4 and vec in tiles_i:
            sch.vectorize(init_loops[-1])

        if anchor is not None:
            sch.reverse_compute_at(tail, anchor, preserve_unit_loops=True)
            tail_loops = sch.get_loops(tail)
            n_tail = len(inner)
            tile = tail_loops[len(tail_loops) - n_tail:] if n_tail else []
            if tile and fv > lanes and reg is None and vec in tiles_i:
                unroll_, lane = sch.split(tile[-1], [None, lanes])
                sch.unroll(unroll_)
                sch.vectorize(lane)
            elif tile and fv >= 4 and vec in tiles_i:
                sch.vectorize(tile[-1])
        else:
            _schedule_spatial(sch, tail, target)
        for block_ in kept + broadcast[-1:]:
            _schedule_spatial(sch, block_, target)
        return sch


def default_rules() -> list[ScheduleRule]:
    """The rules tvmedge applies to every CPU kernel without a tuning record, in order."""
    from tvm.s_tir import dlight as dl

    return [WinogradTransform(), SpatialReduction(), Injective(), dl.cpu.Reduction(), Parallel()]
