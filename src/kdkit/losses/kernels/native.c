/*
 * kdkit native row kernel (CPU): the row pass of kdkit.losses.kernels, in plain C.
 *
 * For each row i of student s [n, C] and teacher t [n, C] (row-major, contiguous):
 *   loss_out[i]  = T^2 * D(p_t, p_s)            (D: kldiv, soft_ce, reverse_kl, jsd)
 *   grad_out[i]  = d loss_out[i] / d s[i]        (optional; written in the student dtype)
 * with p = softmax(x / T).  Terms whose left probability is exactly 0 contribute exactly
 * 0 (value and gradient), so -inf (masked) classes never produce NaN.  Element-wise maths
 * is in float for float/bfloat16/float16 inputs ("compute" 0) or double ("compute" 1);
 * the row sums (of exponentials and of loss terms) are always accumulated in double.
 *
 * Per row: (1) max of s and t; (2) e = exp((x - max) / T) into a per-thread scratch row,
 * and their sums; (3) loss terms (reverse_kl/jsd keep p_s and log p_s - log r in the
 * scratch; jsd's log m is logaddexp(log beta + log p_t, log(1 - beta) + log p_s) with
 * the larger term's log and log1p(min / max) of the two probabilities already at hand: no
 * exp, one division per class, #24); (4) the gradient from the scratch.  s and t are read three times, the
 * gradient written once.  Rows are handed out in blocks from one atomic counter to the
 * threads of one call (pthreads, or OpenMP if built with KDKIT_USE_OPENMP), so a thread
 * the OS descheduled does not hold the others back.
 *
 * kdkit_batch_pass (small batches, #24 item 2): the whole student loss of one batch --
 * cross-entropy at T = 1, teacher confidence and KD weights, the weighted KD mean, their
 * combination, the statistics and the value checks -- and its gradient, in one call on
 * one thread; the KD term of each row is the row pass above (one formula).
 *
 * No Python or torch headers: compiled at first use by kdkit.losses.kernels.native with
 * the system C compiler (about a second) and cached on disk.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef KDKIT_USE_OPENMP
#include <omp.h>
#else
#include <pthread.h>
#endif

#define KDKIT_ABI 4

enum { DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3 };
enum { LT_KLDIV = 0, LT_SOFT_CE = 1, LT_REVERSE_KL = 2, LT_JSD = 3 };

int kdkit_abi(void) { return KDKIT_ABI; }

/* ---- conversions ---------------------------------------------------------------- */

static inline float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_store(float f) { /* round to nearest even, NaN kept */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(nan ? ((u >> 16) | 0x40u) : rounded);
}

#ifdef __FLT16_MAX__
#define HAVE_F16 1
static inline float f16_load(_Float16 h) { return (float)h; }
static inline _Float16 f16_store(float f) { return (_Float16)f; }
#else
#define HAVE_F16 0
#endif

#define ID_LOAD(x) (x)
#define F_STORE(x) ((float)(x))
#define D_STORE(x) ((double)(x))
#define BF_LOAD(x) bf16_load(x)
#define BF_STORE(x) bf16_store((float)(x))
#define H_LOAD(x) f16_load(x)
#define H_STORE(x) f16_store((float)(x))

/* ---- float transcendentals that vectorise (no libm call inside the loops) ---------- */

static inline float bits_to_float(int32_t i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}

/* exp(x), about 1 ulp, subnormal results kept; 0 for x < -103.97 (so exp(-inf) = 0). */
static inline float kd_expf(float x) {
    const float lo = -103.972084f, hi = 88.7228391f;
    float xc = x < lo ? lo : x;
    xc = xc > hi ? hi : xc;
    /* round to nearest by the 1.5 * 2^23 trick (no libm call; |value| < 2^22 here) */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    n = n == n ? n : 0.0f; /* NaN input: keep the integer part defined, y is NaN anyway */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t ni = (int32_t)n;
    int32_t n1 = ni >> 1, n2 = ni - n1; /* two normal scale factors reach 2^-150 */
    float y = p * bits_to_float((n1 + 127) << 23) * bits_to_float((n2 + 127) << 23);
    return x < lo ? 0.0f : y;
}

/* log(1 + mn / mx) for 0 <= mn <= mx, mx > 0: 2 atanh(u) with u = mn / (2 mx + mn) in
 * [0, 1/3] (one division, no exp), series to u^15 (< 2e-9 relative). */
static inline float kd_log1p_ratiof(float mn, float mx) {
    float u = mn / (2.0f * mx + mn), u2 = u * u;
    float q = 1.0f / 15.0f;
    q = q * u2 + 1.0f / 13.0f;
    q = q * u2 + 1.0f / 11.0f;
    q = q * u2 + 1.0f / 9.0f;
    q = q * u2 + 1.0f / 7.0f;
    q = q * u2 + 1.0f / 5.0f;
    q = q * u2 + 1.0f / 3.0f;
    return 2.0f * u * (1.0f + q * u2);
}

#define F_EXP(x) kd_expf(x)
#define F_LOG1P_RATIO(mn, mx) kd_log1p_ratiof(mn, mx)
#define D_EXP(x) exp(x)
#define D_LOG1P_RATIO(mn, mx) log1p((mn) / (mx))

/* ---- the row pass ------------------------------------------------------------------ */

typedef struct ctx ctx_t;
typedef void (*row_fn)(const ctx_t *, int64_t, void *);

struct ctx {
    const void *s, *t;
    void *loss, *grad;
    int64_t n, C, block, next;
    double inv_t, temp, beta;
    double gscale; /* the gradient's factor (a reduction's 1 / B, say); the loss has none */
    int loss_type;
    int failed;
    size_t scratch_bytes;
    row_fn row;
};

/*
 * One row.  IN: element type of s, t and grad; A: accumulation type.  The scratch holds
 * two rows of A: es = exp((s - max_s) / T) (then p_s), et = exp((t - max_t) / T) (then
 * log p_s - log r for reverse_kl / jsd).
 */
#define DEFINE_ROW(NAME, IN, A, LOAD, STORE, EXP, LOG1P_RATIO)                             \
    static void NAME(const ctx_t *c, int64_t r, void *scratch) {                           \
        const int64_t C = c->C;                                                            \
        const IN *restrict s = (const IN *)c->s + r * C;                                   \
        const IN *restrict t = (const IN *)c->t + r * C;                                   \
        A *restrict es = (A *)scratch;                                                     \
        A *restrict et = es + C;                                                           \
        const A inv_t = (A)c->inv_t, temp = (A)(c->temp * c->gscale), zero = 0;           \
        A ms = -INFINITY, mt = -INFINITY;                                                  \
        _Pragma("omp simd reduction(max : ms, mt)")                                        \
        for (int64_t j = 0; j < C; j++) {                                                  \
            A a = LOAD(s[j]), b = LOAD(t[j]);                                              \
            ms = a > ms ? a : ms;                                                          \
            mt = b > mt ? b : mt;                                                          \
        }                                                                                  \
        double zs = 0, zt = 0; /* sums in double: log Z enters every log-probability */   \
        _Pragma("omp simd reduction(+ : zs, zt)")                                          \
        for (int64_t j = 0; j < C; j++) {                                                  \
            A e = EXP((LOAD(s[j]) - ms) * inv_t), f = EXP((LOAD(t[j]) - mt) * inv_t);      \
            es[j] = e;                                                                     \
            et[j] = f;                                                                     \
            zs += e;                                                                       \
            zt += f;                                                                       \
        }                                                                                  \
        const A lzs = (A)log(zs), lzt = (A)log(zt);                                        \
        const A rzs = (A)(1 / zs), rzt = (A)(1 / zt);                                      \
        double acc = 0, acc2 = 0, value;                                                   \
        IN *restrict g = c->grad ? (IN *)c->grad + r * C : NULL;                           \
        if (c->loss_type == LT_KLDIV || c->loss_type == LT_SOFT_CE) {                      \
            const int kl = c->loss_type == LT_KLDIV;                                       \
            _Pragma("omp simd reduction(+ : acc)")                                         \
            for (int64_t j = 0; j < C; j++) {                                              \
                A lps = (LOAD(s[j]) - ms) * inv_t - lzs;                                   \
                A lpt = (LOAD(t[j]) - mt) * inv_t - lzt;                                   \
                A pt = et[j] * rzt;                                                        \
                A term = pt * (kl ? lpt - lps : -lps);                                     \
                acc += pt > zero ? term : zero;                                            \
            }                                                                              \
            value = acc;                                                                   \
            if (g) {                                                                       \
                _Pragma("omp simd")                                                        \
                for (int64_t j = 0; j < C; j++)                                            \
                    g[j] = STORE(temp * (es[j] * rzs - et[j] * rzt));                      \
            }                                                                              \
        } else if (c->loss_type == LT_REVERSE_KL) {                                        \
            _Pragma("omp simd reduction(+ : acc)")                                         \
            for (int64_t j = 0; j < C; j++) {                                              \
                A lps = (LOAD(s[j]) - ms) * inv_t - lzs;                                   \
                A lpt = (LOAD(t[j]) - mt) * inv_t - lzt;                                   \
                A ps = es[j] * rzs, d = lps - lpt;                                         \
                acc += ps > zero ? ps * d : zero;                                          \
                es[j] = ps;                                                                \
                et[j] = d;                                                                 \
            }                                                                              \
            value = acc;                                                                   \
            if (g) {                                                                       \
                _Pragma("omp simd")                                                        \
                for (int64_t j = 0; j < C; j++) {                                          \
                    A ps = es[j];                                                          \
                    g[j] = STORE(ps > zero ? temp * ps * (et[j] - (A)acc) : zero);         \
                }                                                                          \
            }                                                                              \
        } else { /* jsd, 0 < beta < 1: log m = log max + log(1 + min / max) (see above) */ \
            const A beta = (A)c->beta, omb = (A)(1 - c->beta);                             \
            const A lb = (A)log(c->beta), l1b = (A)log1p(-c->beta);                        \
            _Pragma("omp simd reduction(+ : acc, acc2)")                                   \
            for (int64_t j = 0; j < C; j++) {                                              \
                A lps = (LOAD(s[j]) - ms) * inv_t - lzs;                                   \
                A lpt = (LOAD(t[j]) - mt) * inv_t - lzt;                                   \
                A pt = et[j] * rzt, ps = es[j] * rzs;                                      \
                A a = beta * pt, b = omb * ps, la = lb + lpt, lb_ = l1b + lps;             \
                int first = a > b;                                                         \
                A mx = first ? a : b, mn = first ? b : a, lmx = first ? la : lb_;          \
                A lm = lmx + (mx > zero ? LOG1P_RATIO(mn, mx) : zero);                     \
                lm = lmx > -INFINITY ? lm : zero;                                          \
                A d = lps - lm;                                                            \
                acc += pt > zero ? pt * (lpt - lm) : zero;                                 \
                acc2 += ps > zero ? ps * d : zero;                                         \
                es[j] = ps;                                                                \
                et[j] = d;                                                                 \
            }                                                                              \
            value = c->beta * acc + (1 - c->beta) * acc2;                                  \
            if (g) {                                                                       \
                const A w = temp * (1 - beta);                                             \
                _Pragma("omp simd")                                                        \
                for (int64_t j = 0; j < C; j++) {                                          \
                    A ps = es[j];                                                          \
                    g[j] = STORE(ps > zero ? w * ps * (et[j] - (A)acc2) : zero);           \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        ((A *)c->loss)[r] = (A)(c->temp * c->temp * value);                                \
    }

DEFINE_ROW(row_f32_f32, float, float, ID_LOAD, F_STORE, F_EXP, F_LOG1P_RATIO)
DEFINE_ROW(row_f32_f64, float, double, ID_LOAD, F_STORE, D_EXP, D_LOG1P_RATIO)
DEFINE_ROW(row_f64_f64, double, double, ID_LOAD, D_STORE, D_EXP, D_LOG1P_RATIO)
DEFINE_ROW(row_bf16_f32, uint16_t, float, BF_LOAD, BF_STORE, F_EXP, F_LOG1P_RATIO)
DEFINE_ROW(row_bf16_f64, uint16_t, double, BF_LOAD, BF_STORE, D_EXP, D_LOG1P_RATIO)
#if HAVE_F16
DEFINE_ROW(row_f16_f32, _Float16, float, H_LOAD, H_STORE, F_EXP, F_LOG1P_RATIO)
DEFINE_ROW(row_f16_f64, _Float16, double, H_LOAD, H_STORE, D_EXP, D_LOG1P_RATIO)
#endif

/* The inputs of the row function (kdkit_row_pass and kdkit_batch_pass). */
static void ctx_init(ctx_t *c, const void *s, const void *t, void *loss, void *grad, int64_t n,
                     int64_t C, double temperature, int loss_type, double beta) {
    c->s = s;
    c->t = t;
    c->loss = loss;
    c->grad = grad;
    c->n = n;
    c->C = C;
    c->inv_t = 1.0 / temperature;
    c->temp = temperature;
    c->gscale = 1.0;
    c->beta = beta;
    c->loss_type = loss_type;
}

static void *worker(void *arg) {
    ctx_t *c = (ctx_t *)arg;
    void *scratch = malloc(c->scratch_bytes);
    if (!scratch) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    for (;;) {
        int64_t begin = __atomic_fetch_add(&c->next, c->block, __ATOMIC_RELAXED);
        if (begin >= c->n) break;
        int64_t end = begin + c->block < c->n ? begin + c->block : c->n;
        for (int64_t r = begin; r < end; r++) c->row(c, r, scratch);
    }
    free(scratch);
    return NULL;
}

/* ---- backward: grad[i, :] *= scale[i] for half gradients, one rounding ---------------- */

typedef struct {
    void *grad;
    const float *scale;
    int64_t n, C, block, next;
    int dtype;
} scale_ctx_t;

static void *scale_worker(void *arg) {
    scale_ctx_t *c = (scale_ctx_t *)arg;
    for (;;) {
        int64_t begin = __atomic_fetch_add(&c->next, c->block, __ATOMIC_RELAXED);
        if (begin >= c->n) break;
        int64_t end = begin + c->block < c->n ? begin + c->block : c->n;
        for (int64_t r = begin; r < end; r++) {
            const float k = c->scale[r];
            if (c->dtype == DT_BF16) {
                uint16_t *g = (uint16_t *)c->grad + r * c->C;
                _Pragma("omp simd")
                for (int64_t j = 0; j < c->C; j++) g[j] = bf16_store(bf16_load(g[j]) * k);
            }
#if HAVE_F16
            else {
                _Float16 *g = (_Float16 *)c->grad + r * c->C;
                _Pragma("omp simd")
                for (int64_t j = 0; j < c->C; j++) g[j] = f16_store(f16_load(g[j]) * k);
            }
#endif
        }
    }
    return NULL;
}

/* Scale each row of a bfloat16 / float16 [n, C] gradient by a float32 factor in float32,
 * rounding once.  Returns 0, or -1 for an unsupported dtype. */
int kdkit_scale_rows(void *grad, const float *scale, int64_t n, int64_t C, int dtype,
                     int num_threads, int64_t block_elements) {
    if (dtype != DT_BF16 && !(HAVE_F16 && dtype == DT_F16)) return -1;
    if (n <= 0 || C <= 0) return 0;
    scale_ctx_t c = {grad, scale, n, C, block_elements / C > 1 ? block_elements / C : 1, 0, dtype};
    int64_t blocks = (n + c.block - 1) / c.block;
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > blocks) threads = (int)blocks;
    if (threads > 256) threads = 256;
#ifdef KDKIT_USE_OPENMP
#pragma omp parallel num_threads(threads)
    scale_worker(&c);
#else
    pthread_t ids[256];
    int started = 0;
    for (int k = 1; k < threads; k++)
        if (pthread_create(&ids[started], NULL, scale_worker, &c) == 0) started++;
    scale_worker(&c);
    for (int k = 0; k < started; k++) pthread_join(ids[k], NULL);
#endif
    return 0;
}

/*
 * Entry point.  dtype: DT_* of s, t and grad_out; compute: 0 float, 1 double (loss_out's
 * type); loss_type: LT_*; beta only for LT_JSD (0 < beta < 1); grad_out may be NULL;
 * grad_scale multiplies grad_out (not loss_out): a reduction's factor, folded in.
 * Returns 0, or -1 for an unsupported dtype, 1 if memory for the scratch ran out.
 */
int kdkit_row_pass(const void *s, const void *t, int64_t n, int64_t C, int dtype, int compute,
                   double temperature, double grad_scale, int loss_type, double beta,
                   void *loss_out,
                   void *grad_out, int num_threads, int64_t block_elements) {
    ctx_t c;
    memset(&c, 0, sizeof c);
    c.row = NULL;
    switch (dtype * 2 + (compute != 0)) {
        case DT_F32 * 2: c.row = row_f32_f32; break;
        case DT_F32 * 2 + 1: c.row = row_f32_f64; break;
        case DT_F64 * 2 + 1: c.row = row_f64_f64; break;
        case DT_BF16 * 2: c.row = row_bf16_f32; break;
        case DT_BF16 * 2 + 1: c.row = row_bf16_f64; break;
#if HAVE_F16
        case DT_F16 * 2: c.row = row_f16_f32; break;
        case DT_F16 * 2 + 1: c.row = row_f16_f64; break;
#endif
        default: return -1;
    }
    if (n <= 0) return 0;
    ctx_init(&c, s, t, loss_out, grad_out, n, C, temperature, loss_type, beta);
    c.gscale = grad_scale;
    c.scratch_bytes = (size_t)(2 * C) * (compute ? sizeof(double) : sizeof(float));
    c.block = block_elements / C > 1 ? block_elements / C : 1;
    int64_t blocks = (n + c.block - 1) / c.block;
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > blocks) threads = (int)blocks;
    if (threads <= 1) {
        worker(&c);
        return c.failed;
    }
#ifdef KDKIT_USE_OPENMP
#pragma omp parallel num_threads(threads)
    worker(&c);
#else
    pthread_t ids[256];
    if (threads > 256) threads = 256;
    int started = 0;
    for (int k = 1; k < threads; k++) {
        if (pthread_create(&ids[started], NULL, worker, &c) == 0) started++;
    }
    worker(&c); /* the calling thread works too; a failed create only means fewer threads */
    for (int k = 0; k < started; k++) pthread_join(ids[k], NULL);
#endif
    return c.failed;
}

/* ---- the small-batch pass: the whole student loss of one batch (#24 item 2) -------------
 *
 * For rows i < n of s, t [n, C] (float or double, compute in the same type, sums in double),
 * targets y [n] (int64, or NULL: every row valid, no CE) and keep [n] (uint8 or NULL):
 *
 *   valid_i = y_i != ignore_index          oor_i = valid_i and (y_i < 0 or y_i >= C)
 *   c_i     = max softmax(t_i) (T = 1)     w_i = {1, c_i, [c_i > threshold]} (weighting 0/1/2)
 *   w_i     = w_i if valid_i and keep_i else 0;      sel_i = w_i > 0
 *   ce_i    = logsumexp(s_i) - s_i[clamp(y_i)]      (valid rows, alpha < 1)
 *   l_i     = the row pass's T^2 D(p_t, p_s)         (alpha > 0)
 *   loss    = (1 - alpha) sum_valid ce_i / max(N, 1) + alpha sum_sel w_i l_i / max(W, tiny)
 *
 * with (N, W) = (norm[0], norm[1]) if norm is not NULL, else (sum valid_i, sum w_i); the
 * first term is left out at alpha = 1 and the second at alpha = 0 (value and gradient).
 * grad (NULL: none) = d loss / d s, exactly 0 in rows that enter neither term.
 * values[BV_*] (double): the sums below and the flags; the row checks are those of
 * kdkit._validation.bad_rows (NaN, +inf, or no finite entry), over every row.
 * Returns 0, -1 for an unsupported dtype, 1 if memory ran out.
 */
enum {
    BV_CE_SUM, BV_KD_SUM, BV_VALID, BV_WEIGHT, BV_SELECTED, BV_CONFIDENCE, BV_CORRECT,
    BV_OUT_OF_RANGE, BV_BAD_STUDENT, BV_BAD_TEACHER, BV_INFINITE_KD, BV_NORM_COUNT,
    BV_NORM_WEIGHT, BV_LOSS, BV_COUNT
};

int kdkit_batch_values(void) { return BV_COUNT; }

#define DEFINE_BATCH(NAME, IN, ROW, TINY)                                                   \
    static int NAME(ctx_t *c, const int64_t *y, const uint8_t *keep, double alpha,          \
                    int weighting, double threshold, int64_t ignore_index,                  \
                    const double *norm, double *values) {                                   \
        const int64_t n = c->n, C = c->C;                                                   \
        const IN *s = (const IN *)c->s, *t = (const IN *)c->t;                              \
        IN *grad = (IN *)c->grad;                                                           \
        double *w = (double *)malloc((size_t)(2 * n) * sizeof(double));                    \
        IN *scratch = (IN *)malloc((size_t)(2 * C) * sizeof(IN));                          \
        IN *kd = (IN *)malloc((size_t)n * sizeof(IN));                                     \
        if (!w || !scratch || !kd) {                                                        \
            free(w);                                                                        \
            free(scratch);                                                                  \
            free(kd);                                                                       \
            return 1;                                                                       \
        }                                                                                   \
        double *smax = w + n;                                                               \
        double valid_n = 0, weight = 0, selected = 0, conf_sum = 0;                         \
        int oor = 0, bad_s = 0, bad_t = 0;                                                  \
        for (int64_t i = 0; i < n; i++) { /* (1) teacher confidence, weights, row checks */ \
            const IN *ti = t + i * C, *si = s + i * C;                                      \
            double mt = -INFINITY, ms = -INFINITY;                                          \
            int nan_t = 0, nan_s = 0;                                                       \
            for (int64_t j = 0; j < C; j++) {                                               \
                double a = ti[j], b = si[j];                                                \
                nan_t |= a != a;                                                            \
                nan_s |= b != b;                                                            \
                mt = a > mt ? a : mt;                                                       \
                ms = b > ms ? b : ms;                                                       \
            }                                                                               \
            int row_bad_t = nan_t || !isfinite(mt);                                         \
            bad_t |= row_bad_t;                                                             \
            bad_s |= nan_s || !isfinite(ms);                                                \
            smax[i] = ms;                                                                   \
            double conf = NAN;                                                              \
            if (!row_bad_t) {                                                               \
                double z = 0;                                                               \
                for (int64_t j = 0; j < C; j++) z += exp((double)ti[j] - mt);               \
                conf = (double)(IN)(1 / z);                                                 \
            }                                                                               \
            int valid = y ? y[i] != ignore_index : 1;                                       \
            oor |= y && valid && (y[i] < 0 || y[i] >= C);                                        \
            double wi = weighting == 0 ? 1.0 : weighting == 1 ? conf : (conf > threshold);  \
            wi = valid && (!keep || keep[i]) ? wi : 0.0;                                    \
            w[i] = wi;                                                                      \
            valid_n += valid;                                                               \
            weight += wi;                                                                   \
            selected += wi > 0;                                                             \
            conf_sum += valid ? conf : 0.0;                                                 \
        }                                                                                   \
        const double count = norm ? norm[0] : valid_n;                                      \
        const double wnorm = norm ? norm[1] : weight;                                       \
        const double a_ce = alpha < 1 ? (1 - alpha) / (count > 1 ? count : 1) : 0;         \
        const double b_kd = alpha > 0 ? alpha / (wnorm > TINY ? wnorm : TINY) : 0;         \
        double ce_sum = 0, kd_sum = 0, correct = 0;                                         \
        int inf_kd = 0;                                                                     \
        c->loss = kd;                                                                       \
        for (int64_t i = 0; i < n; i++) { /* (2) KD by the row pass, then CE, per row */    \
            const IN *si = s + i * C;                                                       \
            IN *g = grad ? grad + i * C : NULL;                                             \
            int sel = w[i] > 0;                                                             \
            if (alpha > 0) {                                                                \
                ROW(c, i, scratch);                                                         \
                double li = kd[i];                                                          \
                if (sel) {                                                                  \
                    kd_sum += w[i] * li;                                                    \
                    inf_kd |= isinf(li);                                                    \
                }                                                                           \
                if (g) {                                                                    \
                    const IN k = (IN)(sel ? b_kd * w[i] : 0);                               \
                    for (int64_t j = 0; j < C; j++) g[j] = sel ? k * g[j] : (IN)0;         \
                }                                                                           \
            } else if (g) {                                                                 \
                for (int64_t j = 0; j < C; j++) g[j] = 0;                                   \
            }                                                                               \
            int valid = y ? y[i] != ignore_index : 0;                                       \
            if (y) { /* argmax (first maximum) for the training accuracy */                 \
                int64_t arg = 0;                                                            \
                for (int64_t j = 1; j < C; j++) arg = si[j] > si[arg] ? j : arg;            \
                correct += arg == y[i];                                                     \
            }                                                                               \
            if (!valid) continue; /* CE of every valid row: a stat also at alpha = 1 */    \
            const int64_t yi = y[i] < 0 ? 0 : y[i] >= C ? C - 1 : y[i];                     \
            const double ms = smax[i];                                                      \
            double z = 0;                                                                   \
            for (int64_t j = 0; j < C; j++) z += exp((double)si[j] - ms);                   \
            ce_sum += (double)(IN)(ms + log(z) - (double)si[yi]);                           \
            if (g && alpha < 1) {                                                           \
                const double rz = 1 / z;                                                    \
                for (int64_t j = 0; j < C; j++)                                             \
                    g[j] = (IN)((double)g[j] +                                              \
                                a_ce * (exp((double)si[j] - ms) * rz - (j == yi)));         \
            }                                                                               \
        }                                                                                   \
        const double ce = ce_sum / (count > 1 ? count : 1);                                 \
        const double kdm = kd_sum / (wnorm > TINY ? wnorm : TINY);                          \
        values[BV_CE_SUM] = ce_sum;                                                         \
        values[BV_KD_SUM] = alpha > 0 ? kd_sum : 0.0;                                       \
        values[BV_VALID] = valid_n;                                                         \
        values[BV_WEIGHT] = weight;                                                         \
        values[BV_SELECTED] = selected;                                                     \
        values[BV_CONFIDENCE] = conf_sum;                                                   \
        values[BV_CORRECT] = correct;                                                       \
        values[BV_OUT_OF_RANGE] = oor;                                                      \
        values[BV_BAD_STUDENT] = bad_s;                                                     \
        values[BV_BAD_TEACHER] = bad_t;                                                     \
        values[BV_INFINITE_KD] = alpha > 0 && inf_kd;                                       \
        values[BV_NORM_COUNT] = count;                                                      \
        values[BV_NORM_WEIGHT] = wnorm;                                                     \
        values[BV_LOSS] = alpha == 0 ? ce : alpha == 1 ? kdm : (1 - alpha) * ce + alpha * kdm; \
        free(w);                                                                            \
        free(scratch);                                                                      \
        free(kd);                                                                           \
        return 0;                                                                           \
    }

DEFINE_BATCH(batch_f32, float, row_f32_f32, 1.1754943508222875e-38)
DEFINE_BATCH(batch_f64, double, row_f64_f64, 2.2250738585072014e-308)

/*
 * Entry point of the small-batch pass.  dtype: DT_F32 or DT_F64 (s, t and grad; the compute
 * type); loss_type: LT_*; beta only for LT_JSD; weighting: 0 none, 1 pmax, 2 threshold.
 * y, keep, norm and grad_out may be NULL; values_out: BV_COUNT doubles.
 */
int kdkit_batch_pass(const void *s, const void *t, const int64_t *y, const uint8_t *keep,
                     int64_t n, int64_t C, int dtype, double temperature, int loss_type,
                     double beta, double alpha, int weighting, double threshold,
                     int64_t ignore_index, const double *norm, void *grad_out,
                     double *values_out) {
    ctx_t c;
    memset(&c, 0, sizeof c);
    ctx_init(&c, s, t, NULL, grad_out, n, C, temperature, loss_type, beta);
    if (dtype == DT_F32)
        return batch_f32(&c, y, keep, alpha, weighting, threshold, ignore_index, norm,
                         values_out);
    if (dtype == DT_F64)
        return batch_f64(&c, y, keep, alpha, weighting, threshold, ignore_index, norm,
                         values_out);
    return -1;
}
