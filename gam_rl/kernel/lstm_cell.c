/* The LSTM cell's elementwise math in one pass per step (gam_rl/kernel/native.py builds and loads it).

   After the step's matmul has written the pre-activations a = [a_i, a_f, a_g2, a_o] of n rows
   (the g rows of the weights doubled, so a_g2 = 2 a_g), the torch path needs 8 to 11 separate
   elementwise ops per layer and step, each a pass over memory with its own dispatch; here every
   step is one loop over the rows. Rows are split between OpenMP threads (torch's own runtime:
   the library links the libgomp that torch loaded).

   Cell (sigma = logistic, tanh(x) = 2 sigma(2x) - 1):
       i, f, o = sigma(a_i), sigma(a_f), sigma(a_o),   g = 2 sigma(a_g2) - 1 = tanh(a_g)
       c' = f c + i g,   h' = o tanh(c')
   Backward at one step, with dh the gradient on h' (from above and from the next step) and
   dcf = dc_{t+1} f_{t+1} the gradient reaching c' from the next step:
       dc   = dcf + dh o (1 - tanh(c')^2)
       da_o = dh tanh(c') o (1 - o)
       da_i = dc g i (1 - i),   da_f = dc c f (1 - f),   da_g = dc i (1 - g^2)
       dcf <- dc f  (carried to the step before)
   Compiled with -ffast-math only at compile time (never at link time, which would set the
   process's flush-to-zero flags); inputs of exp are clamped so no infinity is formed. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define CLAMP 80.0f

/* exp(x) for |x| <= CLAMP, inline so the cell's loops vectorise without a call per vector (libm's
   vector expf cost about 2 ns per element there, as much as the step's matmul at 2 x 64):
   exp(x) = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2], ln 2 split
   in two parts (Cody-Waite) so r keeps its precision; e^r = 1 + r + r^2 P(r), P Cephes' degree-5
   fit (relative error about 1e-7, float rounding); 2^n built from its exponent bits. */
static inline float exp_clamped(float x) {
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n: n in [-116, 116] for |x| <= 80 */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return (p * r * r + r + 1.0f) * two_n;
}

static inline float logistic(float x) {
    x = fminf(fmaxf(x, -CLAMP), CLAMP);
    return 1.0f / (1.0f + exp_clamped(-x));
}

#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM omp_get_thread_num()
#define NUM_THREADS omp_get_num_threads()
#else
#define THREAD_NUM 0
#define NUM_THREADS 1
#endif

#define PARALLEL_ROWS(n, H, threads) \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if((n) * (H) >= 16384 && (threads) > 1)")

/* Sums over rows (the weight and bias gradients) do not depend on the number of threads: the rows of a
   pass (of a step) are cut into a fixed grid of `chunks` chunks, chunk c = rows [chunk_lo(n, c), chunk_lo(n,
   c + 1)), chosen by the caller from the problem's size alone; each chunk adds into its own partial sum
   (and makes its own sgemm calls, whose shapes are then the same at any thread count: MKL's results for
   a row can change with the number of rows in the call, e.g. one row goes through another kernel), and
   the partial sums are added in chunk order at the end (add_chunks). A thread takes whole chunks, so one
   thread or sixteen give bit-identical results. */
static inline int64_t chunk_lo(int64_t n, int64_t c, int64_t chunks) { return n * c / chunks; }

/* acc[0][e] += acc[1][e] + ... in chunk order, e in [0, size), inside a parallel region (every thread
   of the team calls it; each adds its own share of e, with a barrier after): the per-element order of
   the adds is fixed, so the result does not depend on which thread adds which elements. */
static inline void add_chunks(float *acc, int64_t size, int64_t chunks, int64_t me, int64_t share) {
    const int64_t lo = size * me / share, hi = size * (me + 1) / share;
    for (int64_t c = 1; c < chunks; c++) {
        const float *part = acc + c * size;
        for (int64_t e = lo; e < hi; e++) acc[e] += part[e];
    }
}

/* What a call of cell_forward / cell_backward reads and writes besides the cell itself. Every call
   passes these flags as constants, so each inlined copy is straight-line vector code: a pointer tested
   per element would be if-converted into masked loads and stores (vmaskmovps), which cost ~10 cycles
   each on AMD's Zen and made the cell ~3x slower than its arithmetic. */
#define CELL_ADD 1   /* forward: a + add */
#define CELL_CP 2    /* the previous c (else c = 0: t = 0) */
#define CELL_X 4     /* forward: also x = h' (times mask with CELL_MASK) */
#define CELL_MASK 8  /* a dropout mask: on x (forward), on the gradient from above (backward) */
#define CELL_ACT 16  /* forward: keep the activated gates and tanh(c') for the backward */
#define CELL_REC 32    /* backward: add rec, the gradient the next step sends back to h' */
#define CELL_CARRY 64  /* backward: add dcf = dc_{t+1} f_{t+1} (the row is alive at t + 1) */

/* The cell on one row: pre-activations a (4H) (+ add), cp (H) the previous c; writes c, h' and, per
   flags, x and the activated gates [i, f, g, o] (into g_act, 4H, may be a itself) and tanh(c') (tc_out). */
static inline void cell_forward(int64_t H, const int flags, const float *a, const float *add, const float *cp,
                                float *c, float *h, float *x, const float *mask, float *g_act, float *tc_out) {
#pragma omp simd
    for (int64_t j = 0; j < H; j++) {
        float ai = a[j], af = a[H + j], ag = a[2 * H + j], ao = a[3 * H + j];
        if (flags & CELL_ADD) {
            ai += add[j]; af += add[H + j]; ag += add[2 * H + j]; ao += add[3 * H + j];
        }
        float i = logistic(ai), f = logistic(af);
        float g = 2.0f * logistic(ag) - 1.0f, o = logistic(ao);
        float cn = flags & CELL_CP ? f * cp[j] + i * g : i * g;  /* c' = f c + i g  (c = 0 at t = 0) */
        float tc = 2.0f * logistic(2.0f * cn) - 1.0f;  /* tanh(c') */
        float hn = o * tc;                              /* h' = o tanh(c') */
        c[j] = cn;
        h[j] = hn;
        if (flags & CELL_X) x[j] = flags & CELL_MASK ? hn * mask[j] : hn;
        if (flags & CELL_ACT) {
            g_act[j] = i; g_act[H + j] = f; g_act[2 * H + j] = g; g_act[3 * H + j] = o;
            tc_out[j] = tc;
        }
    }
}

/* The cell on one row as the sampler, the scorer and the per-step loops call it: a (4H) pre-activations
   (bias included), cp NULL at t = 0; writes c, h and (g_act not NULL) the activated gates and tanh(c'). */
static inline void cell_forward_row(int64_t H, const float *a, const float *cp, float *c, float *h, float *g_act,
                                    float *tc_out) {
    if (cp && g_act)
        cell_forward(H, CELL_CP | CELL_ACT, a, 0, cp, c, h, 0, 0, g_act, tc_out);
    else if (cp)
        cell_forward(H, CELL_CP, a, 0, cp, c, h, 0, 0, 0, 0);
    else if (g_act)
        cell_forward(H, CELL_ACT, a, 0, 0, c, h, 0, 0, g_act, tc_out);
    else
        cell_forward(H, 0, a, 0, 0, c, h, 0, 0, 0, 0);
}

/* One step of one layer over n rows. pre: (n, 4H) pre-activations, row stride ld_pre.
   c_prev: (n, H) cell of the previous step (NULL at t = 0), row stride H; may equal c_out.
   Writes c_out (n, H), h_out (row stride ld_h) and, when not NULL, the activated gates
   [i, f, g, o] into act (row stride 4H) and tanh(c') into tanh_c (row stride H): what the
   backward needs. */
void gam_cell_forward(int64_t n, int64_t H, const float *pre, int64_t ld_pre, const float *c_prev,
                      float *c_out, float *h_out, int64_t ld_h, float *act, float *tanh_c, int threads) {
    PARALLEL_ROWS(n, H, threads)
    for (int64_t r = 0; r < n; r++)
        cell_forward_row(H, pre + r * ld_pre, c_prev ? c_prev + r * H : 0, c_out + r * H, h_out + r * ld_h,
                         act ? act + r * 4 * H : 0, tanh_c ? tanh_c + r * H : 0);
}

/* Backward of the cell on one row (see the formulas above): ga (4H) activated [i, f, g, o] in,
   [da_i, da_f, da_g, da_o] out; cp the previous c (CELL_CP; else t = 0); tc tanh(c'); the gradient on h'
   is dh = above mask (CELL_MASK) + rec (CELL_REC: what the next step sends back, da_{t+1} W_hh); d (H)
   carries dcf = dc_{t+1} f_{t+1} in (CELL_CARRY) and dc f out; sum (4H, NULL: none) += da. */
static inline void cell_backward(int64_t H, const int flags, float *ga, const float *cp, const float *tc,
                                 const float *above, const float *mask, const float *rec, float *d, float *sum) {
#pragma omp simd
    for (int64_t j = 0; j < H; j++) {
        float i = ga[j], f = ga[H + j], g = ga[2 * H + j], o = ga[3 * H + j], t = tc[j];
        float dh = flags & CELL_MASK ? above[j] * mask[j] : above[j];
        if (flags & CELL_REC) dh += rec[j];
        float dc = dh * o * (1.0f - t * t);  /* dc = dcf + dh o (1 - tanh(c')^2) */
        if (flags & CELL_CARRY) dc += d[j];
        ga[3 * H + j] = dh * t * o * (1.0f - o);  /* da_o */
        ga[j] = dc * g * i * (1.0f - i);           /* da_i */
        ga[H + j] = flags & CELL_CP ? dc * cp[j] * f * (1.0f - f) : 0.0f;  /* da_f (c = 0 at t = 0) */
        ga[2 * H + j] = dc * i * (1.0f - g * g);   /* da_g */
        d[j] = dc * f;                             /* dc_t f_t, to step t - 1 */
    }
    if (sum) {
#pragma omp simd
        for (int64_t j = 0; j < 4 * H; j++) sum[j] += ga[j];
    }
}

/* Backward of one step of one layer over the n rows alive at it; the first m (<= n) are alive at
   the next step, so only they carry dcf in (the others start from 0). gates: (n, 4H) activated
   [i, f, g, o] in, overwritten with [da_i, da_f, da_g, da_o]. c_prev: c (n, H), NULL at t = 0;
   tanh_c: tanh(c'); dh: (n, H); dcf: (n, H) in (first m rows) and out.
   acc (NULL: none): each row's da is also added to acc[chunk][index[r]] (index NULL: row 0), a
   (chunks, acc_rows, 4H) block of per-chunk sums (rows cut by chunk_lo; the caller adds them in chunk
   order), while it is still in cache: layer 0's table gradient (rows by input symbol) or layer l's bias
   gradient, which would otherwise be another pass over all N positions (an index_add or a sum: ~5% of
   a 2 x 64 training step). */
void gam_cell_backward(int64_t n, int64_t m, int64_t H, float *gates, const float *c_prev, const float *tanh_c,
                       const float *dh, float *dcf, int threads, float *acc, const int64_t *index, int64_t acc_rows,
                       int64_t chunks) {
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(n * H >= 16384 && threads > 1 && chunks > 1)")
    for (int64_t ch = 0; ch < chunks; ch++)
    for (int64_t r = chunk_lo(n, ch, chunks); r < chunk_lo(n, ch + 1, chunks); r++) {  /* dh: step t + 1's in */
        float *ga = gates + r * 4 * H;
        float *sum = acc ? acc + (ch * acc_rows + (index ? index[r] : 0)) * 4 * H : 0;
        const float *cp = c_prev ? c_prev + r * H : 0;
        if (cp && r < m)
            cell_backward(H, CELL_CP | CELL_CARRY, ga, cp, tanh_c + r * H, dh + r * H, 0, 0, dcf + r * H, sum);
        else if (cp)
            cell_backward(H, CELL_CP, ga, cp, tanh_c + r * H, dh + r * H, 0, 0, dcf + r * H, sum);
        else if (r < m)
            cell_backward(H, CELL_CARRY, ga, 0, tanh_c + r * H, dh + r * H, 0, 0, dcf + r * H, sum);
        else
            cell_backward(H, 0, ga, 0, tanh_c + r * H, dh + r * H, 0, 0, dcf + r * H, sum);
    }
}

/* The sampler's per-step bookkeeping after the head: n working rows with logits (n, 3) (row
   stride 3) and uniforms u (n,); symbol k is drawn when cdf_{k-1} < u <= cdf_k (inverse CDF
   over 0, 1, EOS = 2). rows: original index of each working row; running: 1 while the row has
   not written EOS. Writes tok (n,) (PAD = pad for finished rows), tokens[rows[r], t] and
   token_logp[rows[r], t] (row stride ld), adds log p(tok) to log_prob[rows[r]], clears running
   at EOS; returns the number of rows still running. */
/* One row's draw and its book-keeping (gam_sample_step); returns 1 if the row is still running. */
static inline int64_t sample_row(const float *z, float u, int64_t row, uint8_t *running, int64_t *tok,
                                 int64_t *tokens, float *token_logp, float *log_prob, int64_t ld, int64_t t,
                                 int64_t eos, int64_t pad) {
    /* log softmax over 3: log p_k = z_k - (mx + log sum exp(z - mx)) */
    float mx = fmaxf(z[0], fmaxf(z[1], z[2]));
    float e0 = expf(z[0] - mx), e1 = expf(z[1] - mx), e2 = expf(z[2] - mx);
    float s = e0 + e1 + e2, lse = mx + logf(s);
    float p0 = e0 / s, p01 = (e0 + e1) / s;
    int64_t k = (u > p0) + (u > p01);
    if (!*running) {
        *tok = pad;
        return 0;
    }
    const int64_t pos = row * ld + t;
    const float lp = z[k] - lse;
    *tok = k;
    tokens[pos] = k;
    token_logp[pos] = lp;
    log_prob[row] += lp;
    if (k == eos) {
        *running = 0;
        return 0;
    }
    return 1;
}

int64_t gam_sample_step(int64_t n, const float *logits, const float *u, const int64_t *rows, uint8_t *running,
                        int64_t *tok, int64_t *tokens, float *token_logp, float *log_prob, int64_t ld, int64_t t,
                        int64_t eos, int64_t pad) {
    int64_t alive = 0;
    for (int64_t r = 0; r < n; r++)
        alive += sample_row(logits + 3 * r, u[r], rows[r], running + r, tok + r, tokens, token_logp, log_prob, ld, t,
                            eos, pad);
    return alive;
}

/* A BLAS sgemm (Fortran interface, 32-bit integers, column-major): torch's own MKL, whose address
   kernel/native.py passes in, so the step's matmul runs on the same library and threads as torch.mm. */
typedef void (*sgemm_fn)(const char *ta, const char *tb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

/* Every step of one layer over a packed batch (rows alive at step t: a prefix of sizes[t] rows
   starting at packed position offsets[t]), with no Python between steps. The step's matmul reads
   row p of z (N, K): layer 0 (K = H) z_p = h_{t-1}; layer l > 0 (K = 2H) z_p = [x_t | h_{t-1}], its
   input (written there by the layer below) beside its own previous output, so that
       a_t = z_t W^T (+ table[index] or + bias)     W = [W_ih | W_hh] (4H, K) (layer 0: W_hh), g rows doubled
   is ONE sgemm per step (row-major (n, 4H) = column-major (4H, n)) and the input projection needs no
   separate matmul over all positions; at t = 0 (h_{-1} = 0) only the first K - H columns count:
   layer 0's a_0 is its table row alone. Then the cell, the activations kept for the backward, h_t
   into z's last H columns at its position at t + 1 (rows alive then), and the layer's output
   x_t = h_t mask_t (mask NULL: h_t) into x_out (row stride ld_x): the next layer's z, or the LSTM's
   output. z's last H columns at t = 0 are zeroed here (the backward's dW = z^T da reads them).
   One parallel region for all steps: each step's rows are cut into the fixed grid of `chunks` chunks
   (chunk_lo), each thread takes a contiguous share of the chunks and runs all of the above on each
   of its chunks (one sgemm per chunk, single-threaded: MKL does not nest inside a parallel region,
   and a chunk stays in its core's cache, where a (250 x 128) @ (128 x 256) runs at ~1.5x the per-core
   rate of one (N x 64) @ (64 x 256) over all positions); a row at step t only reads rows of t - 1, so
   a barrier per step is all the threads share. The chunks make the sgemm calls, and so every bit of
   the result, the same at any number of threads.
   gates, cell, tanh_c: (N, 4H), (N, H), (N, H); table: (rows, 4H) with index (N,) into it, or NULL;
   bias: (4H,) or NULL; mask: (N, H) or NULL. */
void gam_layer_forward(void *sgemm_ptr, int64_t T, const int64_t *sizes, const int64_t *offsets, int64_t H, int64_t K,
                       float *gates, const float *table, const int64_t *index, const float *bias, const float *w,
                       float *z, float *cell, float *tanh_c, const float *mask, float *x_out, int64_t ld_x,
                       int threads, int64_t chunks) {
    sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int four_h = (int)(4 * H), k_all = (int)K, k_input = (int)(K - H);
    const float one = 1.0f, zero = 0.0f;
    _Pragma("omp parallel num_threads(threads) if(threads > 1 && chunks > 1 && sizes[0] * H >= 4096)")
    {
        const int64_t share = NUM_THREADS, me = THREAD_NUM;
        const int64_t c0 = chunks * me / share, c1 = chunks * (me + 1) / share;  /* this thread's chunks */
        float sink[H], zeros[4 * H];  /* sink: h of a row that ends at t (no step t + 1 reads it) */
        memset(zeros, 0, sizeof zeros);
        for (int64_t r = sizes[0] * me / share; r < sizes[0] * (me + 1) / share; r++)
            memset(z + r * K + K - H, 0, sizeof(float) * H);  /* h_{-1} = 0 */
        _Pragma("omp barrier")
        for (int64_t t = 0; t < T; t++) {
            const int64_t n = sizes[t], a = offsets[t];
            const int64_t next = t + 1 < T ? sizes[t + 1] : 0, a_next = t + 1 < T ? offsets[t + 1] : 0;
            const int k = t > 0 ? k_all : k_input;  /* columns of z that are not zero */
            for (int64_t ch = c0; ch < c1; ch++) {
                const int64_t lo = chunk_lo(n, ch, chunks), hi = chunk_lo(n, ch + 1, chunks);
                if (hi > lo && k > 0) {
                    const int rows = (int)(hi - lo);
                    sgemm("T", "N", &four_h, &rows, &k, &one, w, &k_all, z + (a + lo) * K, &k_all, &zero,
                          gates + (a + lo) * 4 * H, &four_h);
                }
                for (int64_t r = lo; r < hi; r++) {
                    const int64_t p = a + r;
                    float *g = gates + p * 4 * H, *h = r < next ? z + (a_next + r) * K + K - H : sink;
                    const float *row = table ? table + index[p] * 4 * H : bias;  /* added to z W^T */
                    const float *pre = k > 0 ? g : row, *add = k > 0 ? row : zeros;  /* layer 0, t = 0: the row */
                    const float *cp = t > 0 ? cell + (offsets[t - 1] + r) * H : zeros;  /* c_{-1} = 0 */
                    if (mask)
                        cell_forward(H, CELL_ADD | CELL_CP | CELL_X | CELL_MASK | CELL_ACT, pre, add, cp,
                                     cell + p * H, h, x_out + p * ld_x, mask + p * H, g, tanh_c + p * H);
                    else
                        cell_forward(H, CELL_ADD | CELL_CP | CELL_X | CELL_ACT, pre, add, cp, cell + p * H, h,
                                     x_out + p * ld_x, 0, g, tanh_c + p * H);
                }
            }
            _Pragma("omp barrier")
        }
    }
}

/* The backward's reverse loop over every step of one layer, in one parallel region as the forward.
   At step t, row by row, the gradient on h_t is
       dh_t = above_t mask_t + dz_{t+1}[last H columns]      (mask NULL: 1; the second term for rows alive at t + 1)
   (above: (N, ld_above), the gradient on the layer's output x from the head or from the layer above),
   then the cell's backward (gates -> da in place, dc carried in dcf; da summed into acc, see
   gam_cell_backward), then two sgemm over a chunk of the step's rows while they are in the thread's cache:
       dz_t = da_t W   (N, K):  [dx_t | the gradient sent back to h_{t-1}]   (layer 0: the latter alone)
       dW^T += z_t^T da_t      into the chunk's block of w_acc (below)
   (dx_t is the layer below's `above`); at t = 0 only the first K - H columns count (h_{-1} = 0).
   The rows of a step are cut into the forward's grid of `chunks` chunks; a chunk's da sums and dW go
   into its own blocks of acc (chunks, acc_rows, 4H) and w_acc (chunks, K, 4H), both zero on entry, and
   are added in chunk order into acc[0] and w_acc[0] at the end: the same bits at any thread count.
   w: (4H, K) row-major, the layer's own [W_ih | W_hh] (not doubled); z: the forward's (N, K);
   dcf: (sizes[0], H), zero. */
void gam_layer_backward(void *sgemm_ptr, int64_t T, const int64_t *sizes, const int64_t *offsets, int64_t H, int64_t K,
                        float *gates, const float *w, const float *cell, const float *tanh_c, const float *above,
                        int64_t ld_above, const float *mask, float *dz, float *dcf, int threads, float *acc,
                        const int64_t *index, int64_t acc_rows, const float *z, float *w_acc, int64_t chunks) {
    sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int four_h = (int)(4 * H), k_all = (int)K, k_input = (int)(K - H);
    const float one = 1.0f, zero = 0.0f;
    _Pragma("omp parallel num_threads(threads) if(threads > 1 && chunks > 1 && sizes[0] * H >= 4096)")
    {
        const int64_t share = NUM_THREADS, me = THREAD_NUM;
        const int64_t c0 = chunks * me / share, c1 = chunks * (me + 1) / share;  /* this thread's chunks */
        float zeros[H];
        memset(zeros, 0, sizeof zeros);
        for (int64_t t = T - 1; t >= 0; t--) {
            const int64_t n = sizes[t], a = offsets[t], m = t + 1 < T ? sizes[t + 1] : 0;
            const int64_t a_next = t + 1 < T ? offsets[t + 1] : 0;
            for (int64_t ch = c0; ch < c1; ch++) {
                const int64_t lo = chunk_lo(n, ch, chunks), hi = chunk_lo(n, ch + 1, chunks);
                float *my_acc = acc ? acc + ch * acc_rows * 4 * H : 0, *my_w_acc = w_acc + ch * K * 4 * H;
                for (int64_t r = lo; r < hi; r++) {
                    const int64_t p = a + r;
                    const float *cp = t > 0 ? cell + (offsets[t - 1] + r) * H : zeros;  /* c_{-1} = 0 */
                    /* a row not alive at t + 1 gets nothing back; its dcf row is still the zero it started as */
                    const float *rec = r < m ? dz + (a_next + r) * K + K - H : zeros;
                    float *sum = my_acc ? my_acc + (index ? index[p] : 0) * 4 * H : 0;
                    if (mask)
                        cell_backward(H, CELL_CP | CELL_MASK | CELL_REC | CELL_CARRY, gates + p * 4 * H, cp,
                                      tanh_c + p * H, above + p * ld_above, mask + p * H, rec, dcf + r * H, sum);
                    else
                        cell_backward(H, CELL_CP | CELL_REC | CELL_CARRY, gates + p * 4 * H, cp, tanh_c + p * H,
                                      above + p * ld_above, 0, rec, dcf + r * H, sum);
                }
                const int k = t > 0 ? k_all : k_input;  /* at t = 0 nothing goes back to h_{-1} */
                if (hi > lo && k > 0) {
                    const int rows = (int)(hi - lo);
                    sgemm("N", "N", &k, &rows, &four_h, &one, w, &k_all, gates + (a + lo) * 4 * H, &four_h, &zero,
                          dz + (a + lo) * K, &k_all);
                    /* dW^T += z_t^T da_t  (row-major (K, 4H) = column-major (4H, K)) */
                    sgemm("N", "T", &four_h, &k, &rows, &one, gates + (a + lo) * 4 * H, &four_h, z + (a + lo) * K,
                          &k_all, &one, my_w_acc, &four_h);
                }
            }
            _Pragma("omp barrier")
        }
        add_chunks(w_acc, K * 4 * H, chunks, me, share);  /* the chunks' sums, in chunk order */
        if (acc) add_chunks(acc, acc_rows * 4 * H, chunks, me, share);
    }
}

/* The first step's state of a block of m rows (StepLSTM's layout, see gam_sample_rows): z zeroed
   but for the BOS input and the constant column, every layer's c zeroed. */
static inline void block_start(int64_t m, int64_t L, int64_t H, int64_t P, int64_t ld_z, int64_t block, int64_t bos,
                               float *z, float *cells) {
    memset(z, 0, sizeof(float) * m * ld_z);
    memset(cells, 0, sizeof(float) * L * block * H);
    for (int64_t r = 0; r < m; r++) {
        z[r * ld_z + bos] = 1.0f;         /* input at t = 0 */
        z[r * ld_z + P + L * H] = 1.0f;   /* the constant column (the top layer's bias row) */
    }
}

/* One step of every layer over the first m rows of a block: a = z[:, col:col+K] w (one sgemm,
   row-major (m, 4H) = column-major (4H, m)), + bias where not NULL, then the cell, whose h goes
   back into z where the layer above and the next step read it. */
static inline void block_layers(sgemm_fn sgemm, int64_t m, int64_t L, int64_t H, int64_t P, int64_t ld_z,
                                int64_t block, const int64_t *w_addr, const int64_t *b_addr, const int64_t *K,
                                const int64_t *col, float *z, float *cells, float *gates) {
    const int four_h = (int)(4 * H), lz = (int)ld_z, rows = (int)m;
    const float one = 1.0f, zero = 0.0f;
    for (int64_t l = 0; l < L; l++) {
        const int k = (int)K[l];
        const float *w = (const float *)(intptr_t)w_addr[l], *b = (const float *)(intptr_t)b_addr[l];
        sgemm("N", "N", &four_h, &rows, &k, &one, w, &four_h, z + col[l], &lz, &zero, gates, &four_h);
        float *c = cells + l * block * H;
        for (int64_t r = 0; r < m; r++) {
            float *g = gates + r * 4 * H;
            if (b) {
#pragma omp simd
                for (int64_t j = 0; j < 4 * H; j++) g[j] += b[j];
            }
            cell_forward_row(H, g, c + r * H, c + r * H, z + r * ld_z + P + l * H, 0, 0);
        }
    }
}

/* The head's logits of one row: logits_v = b_v + h . w_v over V symbols. */
static inline void head_logits(const float *h, int64_t H, int64_t V, const float *head_w, const float *head_b,
                               float *logits) {
    for (int64_t v = 0; v < V; v++) {
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < H; j++) acc += h[j] * head_w[v * H + j];
        logits[v] = head_b[v] + acc;
    }
}

/* Floats of one thread's scratch for gam_score_rows. */
int64_t gam_score_scratch(int64_t block, int64_t L, int64_t H, int64_t P, int64_t V) {
    return block * (2 * P + L * H) + L * block * H + block * 4 * H + V;
}

/* log pi(x) of B rows under the LSTM and its head, without gradients (teacher forcing for scoring):
   rows sorted by length (longest first; lengths[r] symbols, EOS included, from target (B, W)) are
   taken a block of `block` rows at a time, each block by one thread through all of its steps:
   per step, every layer (block_layers: z = [onehot(prev) | h_0 .. h_{L-1} | 1 0 ..], w[l] (K[l], 4H)
   over K[l] columns of z from col[l], bias[l] if not NULL, the cell), then the head's log-softmax
   over V symbols at the row's target, added to log_prob[r] (and written to token_logp[r, t] when
   not NULL: no caller asks yet, but without that store gcc vectorises the loop otherwise and the
   scores move by ~4e-6 per sequence from those the sweeps in docs/measurements.md ran with), then
   the target's one-hot as the next input (BOS at t = 0). A block's z, cells and gates stay in the core's cache for all its steps,
   and the threads share nothing (no barrier, no (N, H) array through memory). scratch: threads x
   gam_score_scratch(...) floats, each thread's z, cells, gates and logits. */
void gam_score_rows(void *sgemm_ptr, int64_t B, int64_t W, const int64_t *target, const int64_t *lengths, int64_t L,
                    int64_t H, int64_t P, const int64_t *w_addr, const int64_t *b_addr, const int64_t *K,
                    const int64_t *col, const float *head_w, const float *head_b, int64_t V, int64_t bos,
                    int64_t block, float *log_prob, float *token_logp, float *scratch, int threads) {
    sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t ld_z = 2 * P + L * H, blocks = (B + block - 1) / block;
    _Pragma("omp parallel num_threads(threads) if(threads > 1 && blocks > 1)")
    {
        float *z = scratch + THREAD_NUM * gam_score_scratch(block, L, H, P, V);
        float *cells = z + block * ld_z, *gates = cells + L * block * H, *logits = gates + block * 4 * H;
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t bi = 0; bi < blocks; bi++) {
            const int64_t r0 = bi * block, nb = B - r0 < block ? B - r0 : block;
            block_start(nb, L, H, P, ld_z, block, bos, z, cells);
            int64_t m = nb;
            for (int64_t t = 0; t < lengths[r0]; t++) {
                while (m > 0 && lengths[r0 + m - 1] <= t) m--;  /* rows still running: a prefix */
                block_layers(sgemm, m, L, H, P, ld_z, block, w_addr, b_addr, K, col, z, cells, gates);
                for (int64_t r = 0; r < m; r++) {
                    const float *h = z + r * ld_z + P + (L - 1) * H;
                    for (int64_t v = 0; v < V; v++) {  /* the head's logits (not head_logits(): its */
                        float acc = 0.0f;              /* vectorised sums round differently here) */
#pragma omp simd reduction(+ : acc)
                        for (int64_t j = 0; j < H; j++) acc += h[j] * head_w[v * H + j];
                        logits[v] = head_b[v] + acc;
                    }
                    float mx = logits[0], sum = 0.0f;
                    for (int64_t v = 1; v < V; v++) mx = fmaxf(mx, logits[v]);
                    for (int64_t v = 0; v < V; v++) sum += expf(logits[v] - mx);
                    const int64_t y = target[(r0 + r) * W + t];
                    const float lp = logits[y] - mx - logf(sum);  /* log softmax at the target */
                    log_prob[r0 + r] += lp;
                    if (token_logp) token_logp[(r0 + r) * W + t] = lp;
                    float *onehot = z + r * ld_z;
                    for (int64_t v = 0; v < P; v++) onehot[v] = (float)(y == v);
                }
            }
        }
    }
}

/* Floats of one thread's scratch for gam_sample_rows (its working rows' index goes in idx). */
int64_t gam_sample_scratch(int64_t block, int64_t L, int64_t H, int64_t P) {
    return block * (2 * P + L * H) + L * block * H + block * 4 * H;
}

/* The sampler with every block of `block` rows taken through all its steps by one thread, as
   gam_score_rows scores: per step every layer over the block's running rows, the head's logits
   z_k = b_k + h_top . w_head[k] over the 3 symbols, the draw from u[row, t] ((num, max_len)
   uniforms drawn up front, so the samples do not depend on the blocks or the threads) booked as
   sample_row books it, the token's one-hot as the next input; a row that wrote EOS leaves the
   block's working rows at once (the rows after it move up, with their z and cells). A block's
   z, cells and gates stay in the core's cache for all its steps. tokens (num, max_len) must hold
   pad, token_logp and log_prob zeros. scratch: threads x gam_sample_scratch(...) floats; idx:
   threads x block int64. */
void gam_sample_rows(void *sgemm_ptr, int64_t num, int64_t max_len, int64_t L, int64_t H, int64_t P,
                     const int64_t *w_addr, const int64_t *b_addr, const int64_t *K, const int64_t *col,
                     const float *head_w, const float *head_b, const float *u, int64_t block, int64_t *tokens,
                     float *token_logp, float *log_prob, int64_t eos, int64_t pad, int64_t bos, float *scratch,
                     int64_t *idx_scratch, int threads) {
    sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t ld_z = 2 * P + L * H, blocks = (num + block - 1) / block;
    _Pragma("omp parallel num_threads(threads) if(threads > 1 && blocks > 1)")
    {
        float *z = scratch + THREAD_NUM * gam_sample_scratch(block, L, H, P);
        float *cells = z + block * ld_z, *gates = cells + L * block * H;
        int64_t *idx = idx_scratch + THREAD_NUM * block;
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t bi = 0; bi < blocks; bi++) {
            const int64_t r0 = bi * block;
            int64_t m = num - r0 < block ? num - r0 : block;  /* the block's running rows, a prefix */
            block_start(m, L, H, P, ld_z, block, bos, z, cells);
            for (int64_t r = 0; r < m; r++) idx[r] = r0 + r;  /* the sample each working row writes */
            for (int64_t t = 0; t < max_len && m > 0; t++) {
                block_layers(sgemm, m, L, H, P, ld_z, block, w_addr, b_addr, K, col, z, cells, gates);
                int64_t kept = 0;
                for (int64_t r = 0; r < m; r++) {
                    float logits[3];
                    head_logits(z + r * ld_z + P + (L - 1) * H, H, 3, head_w, head_b, logits);
                    uint8_t running = 1;
                    int64_t tok;
                    const int64_t row = idx[r];
                    if (!sample_row(logits, u[row * max_len + t], row, &running, &tok, tokens, token_logp, log_prob,
                                    max_len, t, eos, pad))
                        continue;  /* EOS: the row leaves the working rows */
                    if (kept != r) {  /* move the row up over the finished ones */
                        memcpy(z + kept * ld_z, z + r * ld_z, sizeof(float) * ld_z);
                        for (int64_t l = 0; l < L; l++)
                            memcpy(cells + (l * block + kept) * H, cells + (l * block + r) * H, sizeof(float) * H);
                        idx[kept] = row;
                    }
                    float *onehot = z + kept * ld_z;
                    for (int64_t v = 0; v < P; v++) onehot[v] = (float)(tok == v);
                    kept++;
                }
                m = kept;
            }
        }
    }
}

/* Dropout masks: out[i] = scale if u_i < threshold else 0, for i in [0, count), with u_i a uniform
   32-bit integer: the low (i even) or high (i odd) half of SplitMix64 at counter start + i / 2,
       z = seed + (k + 1) gamma,  z = (z ^ z >> 30) m1,  z = (z ^ z >> 27) m2,  z ^ z >> 31
   (Steele, Lea and Flood 2014; the stream passes BigCrush). Counter-based, so the rows split between
   threads and the loop vectorises, and one seed serves several masks at disjoint counter ranges. */
void gam_dropout_mask(int64_t count, uint64_t seed, uint64_t start, uint32_t threshold, float scale, float *out,
                      int threads) {
    const int64_t pairs = count / 2;
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(count >= 65536 && threads > 1)")
    for (int64_t k = 0; k < pairs; k++) {
        uint64_t z = seed + (start + (uint64_t)k + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        out[2 * k] = (uint32_t)z < threshold ? scale : 0.0f;
        out[2 * k + 1] = (uint32_t)(z >> 32) < threshold ? scale : 0.0f;
    }
    if (count % 2) {  /* the last element: the low half of the next counter */
        uint64_t z = seed + (start + (uint64_t)pairs + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        out[count - 1] = (uint32_t)z < threshold ? scale : 0.0f;
    }
}

/* The output head on n positions: logits z = h W^T + b over V symbols (w (V, H), head_logits: V dot
   products per row; at V = 3 torch's (n, H) @ (H, 3) matmul and its (n, 3) output cost more than this
   whole pass), then the log-softmax at the target symbol
       log p(y) = (z_y - m) - log sum_k exp(z_k - m),   m = max_k z_k
   into picked; probs (n, V) gets the softmax p, which the backward needs. */
void gam_head_logp(int64_t n, int64_t V, int64_t H, const float *h, const float *w, const float *b,
                   const int64_t *target, float *probs, float *picked, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(n >= 8192 && threads > 1)")
    for (int64_t r = 0; r < n; r++) {
        float *z = probs + r * V;
        head_logits(h + r * H, H, V, w, b, z);
        float m = z[0], s = 0.0f;
        for (int64_t k = 1; k < V; k++) m = fmaxf(m, z[k]);
        const float zy = z[target[r]] - m;
        for (int64_t k = 0; k < V; k++) s += (z[k] = expf(z[k] - m));
        picked[r] = zy - logf(s);
        for (int64_t k = 0; k < V; k++) z[k] /= s;
    }
}

/* Its backward, with g (n,) the gradient on log p(y) at every position:
       dz_k = g (1[k = y] - p_k),   dh = dz W = sum_k dz_k w_k   (d_out (n, H)),
       dW += dz^T h,  db += dz      (acc: (chunks, V, H + 1), zero, rows [dW_k | db_k]: one block per
                                     chunk of rows (chunk_lo), added in chunk order into acc[0])
   in one pass while h's row is in cache: torch needs a (n, V) @ (V, H) and a (V, n) @ (n, H) matmul,
   both slow at V = 3, and a sum. The fixed chunks make the sums the same at any thread count. */
void gam_head_backward(int64_t n, int64_t V, int64_t H, const float *g, const float *probs, const int64_t *target,
                       const float *w, const float *h, float *d_out, float *acc, int threads, int64_t chunks) {
    _Pragma("omp parallel num_threads(threads) if(n * H >= 65536 && threads > 1 && chunks > 1)")
    {
        float dz[V];
        _Pragma("omp for schedule(static)")
        for (int64_t ch = 0; ch < chunks; ch++)
        for (int64_t r = chunk_lo(n, ch, chunks); r < chunk_lo(n, ch + 1, chunks); r++) {
            float *my_acc = acc + ch * V * (H + 1);
            const float *p = probs + r * V, *hr = h + r * H;
            float *d = d_out + r * H;
            for (int64_t k = 0; k < V; k++) dz[k] = g[r] * ((k == target[r]) - p[k]);
#pragma omp simd
            for (int64_t j = 0; j < H; j++) d[j] = dz[0] * w[j];
            for (int64_t k = 1; k < V; k++) {
                const float c = dz[k], *wk = w + k * H;
#pragma omp simd
                for (int64_t j = 0; j < H; j++) d[j] += c * wk[j];
            }
            for (int64_t k = 0; k < V; k++) {
                float *row = my_acc + k * (H + 1);
                const float c = dz[k];
#pragma omp simd
                for (int64_t j = 0; j < H; j++) row[j] += c * hr[j];
                row[H] += c;
            }
        }
        add_chunks(acc, V * (H + 1), chunks, THREAD_NUM, NUM_THREADS);  /* after the loop's barrier */
    }
}
