# Numpy emulation of small_plan_kernel's node numbering (warp ballots per row, one scan of the
# (row, warp) counts, then lane prefixes): checks its indexing against a plain cumulative sum of the
# new-node flags. Run: python3 scripts/emulate_small_plan_numbering.py
import numpy as np
B, W, L, I = 1024, 32, 32, 11
def emulate(keys, n, divs, d, N):
    # keys: sorted, length n; padded to I*B with 0xffffffff
    K = np.full(I * B, 0xffffffff, dtype=np.uint64); K[:n] = keys
    fresh = np.zeros(I * B, dtype=np.int64)
    for x in range(n):
        if K[x] >= N: continue
        bits = 1 << 8; differs = x == 0
        for k in range(d):
            if not differs: differs = (K[x] // divs[k]) != (K[x - 1] // divs[k])
            if differs: bits |= 1 << k
        fresh[x] = bits
    counts = np.zeros((9, I * W), dtype=np.int64)
    for i in range(I):
        if i * B >= n: continue
        for w in range(W):
            for k in list(range(d)) + [8]:
                xs = i * B + w * 32 + np.arange(32)
                counts[k][i * W + w] = ((fresh[xs] >> k) & 1).sum()
    totals = {}
    per = I * W // 32
    for k in list(range(d)) + [8]:
        sums = [counts[k][l * per:(l + 1) * per].sum() for l in range(32)]
        incl = np.cumsum(sums); totals[k] = incl[-1]; excl = incl - sums
        for l in range(32):
            run = excl[l]
            for q in range(per):
                v = counts[k][l * per + q]; counts[k][l * per + q] = run; run += v
    incl_out = np.zeros((d, n), dtype=np.int64)
    for x in range(n):
        i, t = divmod(x, B); w, lane = divmod(t, 32)
        for k in range(d):
            xs = i * B + w * 32 + np.arange(lane + 1)
            incl_out[k][x] = counts[k][i * W + w] + ((fresh[xs] >> k) & 1).sum()
    return incl_out, totals
rng = np.random.default_rng(0)
for n, N, bad in [(1, 5, 0), (700, 1023, 9), (8192, 10131227, 0), (11264, 200000, 40), (3000, 50000, 3)]:
    p = [200, 220, 250]; divs = [220 * 250, 250, 1]; d = 3
    ids = rng.integers(0, N, n); ids[:bad] = N
    keys = np.sort(ids).astype(np.uint64)
    inc, tot = emulate(keys, n, divs, d, N)
    # reference: flags per level then cumsum
    for k in range(d):
        pre = keys // divs[k]
        flag = np.zeros(n, dtype=np.int64)
        valid = keys < N
        flag[0] = valid[0]
        flag[1:] = (pre[1:] != pre[:-1]) & valid[1:]
        assert (np.cumsum(flag) == inc[k]).all(), (n, k)
        assert tot[k] == flag.sum()
    assert tot[8] == (keys < N).sum()
    print("ok", n)
