"""The Triton kernels of the split decode attention (split_kv_decode.py says what they compute and
how the op launches them). A module of their own because Triton resolves a kernel's calls to other
kernels through its module's globals, and importing it needs Triton (CPU-only installs lack it)."""

import triton
import triton.language as tl


@triton.jit
def combine_splits(part_o, part_m, part_l, out_ptr, bh, splits, group, dim, sob, soh, sog, kv_heads,
                   G: tl.constexpr, D: tl.constexpr):
    # the splits' partial outputs of one (row, head), weighted by their maxima and sums; read
    # past L1 (.cg): other programs wrote them
    b = bh // kv_heads
    h = bh % kv_heads
    rows = tl.arange(0, G)
    cols = tl.arange(0, D)
    top = tl.full([G], float("-inf"), tl.float32)
    for s in range(0, splits):
        top = tl.maximum(top, tl.load(part_m + (bh * splits + s) * G + rows, cache_modifier=".cg"))
    base = tl.where(top == float("-inf"), 0.0, top)
    den = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, D], tl.float32)
    for s in range(0, splits):
        at = (bh * splits + s) * G + rows
        w = tl.exp(tl.load(part_m + at, cache_modifier=".cg") - base)
        den += w * tl.load(part_l + at, cache_modifier=".cg")
        acc += w[:, None] * tl.load(part_o + at[:, None] * D + cols[None, :], cache_modifier=".cg")
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]  # a row with nothing to attend: zeros
    inside = (rows[:, None] < group) & (cols[None, :] < dim)
    tl.store(out_ptr + b * sob + h * soh + rows[:, None] * sog + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def split_kv_attend(q_ptr, k_ptr, v_ptr, m_ptr, part_o, part_m, part_l, out_ptr, counts, scale, length,
                    split_len, kv_heads, group, dim,
                    sqb, sqh, sqg, skb, skh, skl, svb, svh, svl, smb, sml, sob, soh, sog,
                    MASK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                    DOT: tl.constexpr, ONE: tl.constexpr, PDL: tl.constexpr = False):
    # MASK: 0 none, 1 bool (True attends), 2 additive. PDL: launched as a programmatic dependent
    # (stages/kernel_launch.py): wait for the kernel before to end, before any read
    if PDL:
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // kv_heads
    h = bh % kv_heads
    rows = tl.arange(0, G)
    cols = tl.arange(0, D)
    q_in = (rows[:, None] < group) & (cols[None, :] < dim)
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqg + cols[None, :], mask=q_in, other=0.0)
    qf = q.to(tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    m_i = tl.full([G], float("-inf"), tl.float32)
    l_i = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, D], tl.float32)
    for n0 in range(start, end, BLOCK):
        pos = n0 + tl.arange(0, BLOCK)
        valid = pos < end
        kv_in = valid[:, None] & (cols[None, :] < dim)
        k = tl.load(k_ptr + b * skb + h * skh + pos[:, None] * skl + cols[None, :], mask=kv_in, other=0.0)
        if DOT:  # tensor cores, float32 sums
            s = tl.dot(q, tl.trans(k)) * scale
        else:  # (G, BLOCK): each query row against each position, in float32
            s = tl.sum(qf[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale
        if MASK == 1:
            keep = tl.load(m_ptr + b * smb + pos * sml, mask=valid, other=0)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        if MASK == 2:
            s = s + tl.load(m_ptr + b * smb + pos * sml, mask=valid, other=0.0).to(tl.float32)[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: no -inf - -inf
        alpha = tl.exp(m_i - base)
        p = tl.exp(s - base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * svb + h * svh + pos[:, None] * svl + cols[None, :], mask=kv_in, other=0.0)
        if DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new
    if PDL:  # the cache is read: the next kernel may launch and wait for this one
        tl.extra.cuda.gdc_launch_dependents()
    at = (bh * splits + split) * G + rows
    tl.store(part_m + at, m_i)
    tl.store(part_l + at, l_i)
    tl.store(part_o + at[:, None] * D + cols[None, :], acc)
    if ONE:
        # every thread's partials written before the count moves (release); the split that
        # counts last combines (acquire), then zeroes the count for the next call
        tl.debug_barrier()
        done = tl.atomic_add(counts + bh, 1, sem="acq_rel")
        if done == splits - 1:
            combine_splits(part_o, part_m, part_l, out_ptr, bh, splits, group, dim, sob, soh, sog, kv_heads,
                           G=G, D=D)
            tl.store(counts + bh, 0)

@triton.jit
def split_kv_combine(part_o, part_m, part_l, out_ptr, splits, group, dim, sob, soh, sog, kv_heads,
                     G: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        tl.extra.cuda.gdc_wait()
    combine_splits(part_o, part_m, part_l, out_ptr, tl.program_id(0), splits, group, dim, sob, soh, sog,
                   kv_heads, G=G, D=D)
