/* Binarized (XNOR/popcount) GEMM in CUDA C, used by tvmedge/kernels/cupy_backend.py (CuPy
 * RawKernel; compiled with NVRTC).
 *
 * Same contract as kernels/xnor.cl: ±1 values packed 64 per 64-bit word (bit 1 = +1, padding
 * bits 0 in both operands),
 *   A  [MP, KW]  row-major, MP = M rounded up to a multiple of TM (extra rows are zero),
 *   BT [KW, NP]  B transposed, columns padded with zeros to NP (a multiple of blockDim.x),
 *   C  [M, N]    int32, C[i][j] = KBITS - 2 * popcount(A[i] ^ B[j]) = sum_k a_ik * b_jk.
 *
 * Thread (x = column j, y = row tile) keeps TM accumulators in registers. A warp reads 32
 * consecutive words of a BT row (one coalesced 256-byte transaction) and the A word it needs
 * is the same for the whole warp (a broadcast through the read-only cache).
 */
#ifndef TM
#define TM 4
#endif

extern "C" __global__ void xnor_gemm(const unsigned long long *__restrict__ A,
                                     const unsigned long long *__restrict__ BT,
                                     int *__restrict__ C, const int M, const int N, const int NP,
                                     const int KW, const int KBITS)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int i0 = (blockIdx.y * blockDim.y + threadIdx.y) * TM;
    if (j >= NP || i0 >= M)
        return;
    const unsigned long long *a = A + (size_t)i0 * KW;
    int acc[TM];
#pragma unroll
    for (int r = 0; r < TM; ++r)
        acc[r] = 0;
    for (int k = 0; k < KW; ++k) {
        const unsigned long long b = __ldg(BT + (size_t)k * NP + j);
#pragma unroll
        for (int r = 0; r < TM; ++r)
            acc[r] += __popcll(__ldg(a + (size_t)r * KW + k) ^ b);
    }
    if (j < N) {
#pragma unroll
        for (int r = 0; r < TM; ++r)
            if (i0 + r < M)
                C[(size_t)(i0 + r) * N + j] = KBITS - 2 * acc[r];
    }
}
