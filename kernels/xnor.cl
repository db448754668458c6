/* Binarized (XNOR/popcount) GEMM in OpenCL C, used by tvmedge/kernels/opencl_backend.py.
 *
 * Operands are ±1 values packed 64 per ulong (bit 1 = +1, bit k%64 of word k/64; padding bits
 * are 0 in both operands so they never count):
 *   A  [MP, KW]  row-major, MP = M rounded up to a multiple of TM (extra rows are zero),
 *   BT [KW, NP]  B transposed so that neighbouring work-items read neighbouring words
 *                (coalesced on GPUs, one vector load per work-item bundle on CPU devices),
 *   C  [M, N]    int, C[i][j] = KBITS - 2 * popcount(A[i] ^ B[j]) = sum_k a_ik * b_jk.
 *
 * Work-item (j, t) owns column j and rows t*TM .. t*TM+TM-1: each B word it loads is reused TM
 * times from a register, and A[i][k] is the same for all work-items of a row of the work-group
 * (a broadcast). On PoCL's CPU device the work-group loop over dimension 0 is vectorised, so a
 * work-group of 8/16 work-items becomes 512-bit vpxorq/vpopcntq/vpaddq.
 */
#ifndef TM
#define TM 4
#endif

__kernel void xnor_gemm(__global const ulong *restrict A, __global const ulong *restrict BT,
                        __global int *restrict C, const int M, const int N, const int NP,
                        const int KW, const int KBITS)
{
    const int j = (int)get_global_id(0);
    const int i0 = (int)get_global_id(1) * TM;
    __global const ulong *a = A + (size_t)i0 * KW;
    uint acc[TM];
#pragma unroll
    for (int r = 0; r < TM; ++r)
        acc[r] = 0u;
    for (int k = 0; k < KW; ++k) {
        const ulong b = BT[(size_t)k * NP + j];
#pragma unroll
        for (int r = 0; r < TM; ++r)
            acc[r] += (uint)popcount(a[(size_t)r * KW + k] ^ b);
    }
    if (j < N) {
#pragma unroll
        for (int r = 0; r < TM; ++r)
            if (i0 + r < M)
                C[(size_t)(i0 + r) * N + j] = KBITS - 2 * (int)acc[r];
    }
}
