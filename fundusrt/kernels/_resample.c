// Pillow-exact BICUBIC resize of 8-bit RGB, vectorised: fundusrt.kernels._resample.
//
// Reproduces Pillow's ImagingResample for RGB/RGBX images with the weights of cuda/pillow_bicubic.h
// (shared with the CUDA kernels): each pass accumulates uint8 * int32 weight in int32 from 1 << 21 and
// rounds to uint8 with an arithmetic shift and a clamp. The arithmetic is integer and identical, so
// the output is bit-identical to Pillow; only the loop order differs:
//   - horizontal pass: a pixel's four bytes (R, G, B and the padding / next pixel's R) are four int32
//     lanes; with AVX2 two neighbouring pixels meet their two weights in one 8-lane multiply-add and
//     two rows share each weight load; elsewhere two rows share one 8-lane multiply-add per tap;
//   - vertical pass: a row is one long vector of bytes, accumulated in L1-sized blocks.
// The caller picks the pass order (Pillow 13 goes vertical first for some shapes, PR 9549, and the
// uint8 intermediate makes the order visible). Built with -ffp-contract=off so the double weights
// round as in Pillow's x86-64 build. The GIL is released while resampling.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/pillow_bicubic.h"

#define HALF (1 << (FRT_PRECISION_BITS - 1))
#define VBLOCK 64  // bytes of a row the vertical pass accumulates at once (64 int32: 8 ymm registers)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FRT_X86 1
#endif
#if defined(FRT_X86) && !defined(__clang__)
// SSE2 (the x86-64 baseline) has no 32-bit vector multiply; clone the vertical pass for AVX2 machines.
#define FRT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FRT_CLONES
#endif
// Bytes past a row's last pixel the horizontal pass may read (rows near a buffer's end go through a
// padded copy).
#define SLACK 8

typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));

// One resampled axis: a pillow_bicubic.h table, with views of its per-output (first, count) bounds
// and `taps` fixed-point weights (zeros past the count).
typedef struct {
    int out_size;
    int taps;
    int *table;
    int *bounds;
    const int32_t *k;
} Axis;

static int axis_init(Axis *axis, int in_size, int out_size) {
    const int taps = frt_max_taps(in_size, out_size);
    axis->table = malloc(sizeof(int) * (FRT_TABLE_HEADER + (size_t)out_size * (2 + taps)));
    if (!axis->table) {
        return -1;
    }
    for (int i = 0; i < out_size; i++) {
        frt_axis_coeffs_at(in_size, out_size, taps, i, axis->table);
    }
    axis->out_size = out_size;
    axis->taps = taps;
    axis->bounds = axis->table + FRT_TABLE_HEADER;
    axis->k = axis->table + FRT_TABLE_HEADER + 2 * (size_t)out_size;
    return 0;
}

static inline void store_px(uint8_t *dst, const int32_t *acc) {
    dst[0] = frt_clip8(acc[0]);
    dst[1] = frt_clip8(acc[1]);
    dst[2] = frt_clip8(acc[2]);
}

// Horizontal pass, portable: rows [y0, y1) of src (in_px bytes per pixel) to rows 0.. of dst (RGB).
// Each pixel is read as 4 bytes; two rows share every weight, so one 8-lane multiply-add per tap.
FRT_CLONES
static void horizontal_generic(const uint8_t *src, Py_ssize_t src_stride, int in_px, int y0, int y1, const Axis *ax,
                               uint8_t *dst, Py_ssize_t dst_stride) {
    const int taps = ax->taps;
    for (int y = y0; y < y1; y += 2) {
        const uint8_t *r0 = src + y * src_stride;
        const uint8_t *r1 = y + 1 < y1 ? r0 + src_stride : r0;  // odd tail: the last row twice
        uint8_t *d0 = dst + (Py_ssize_t)(y - y0) * dst_stride;
        for (int xx = 0; xx < ax->out_size; xx++) {
            const int first = ax->bounds[2 * xx], count = ax->bounds[2 * xx + 1];
            const int32_t *k = ax->k + (size_t)xx * taps;
            v8i acc = {HALF, HALF, HALF, HALF, HALF, HALF, HALF, HALF};
            const uint8_t *p0 = r0 + (Py_ssize_t)first * in_px;
            const uint8_t *p1 = r1 + (Py_ssize_t)first * in_px;
            for (int x = 0; x < count; x++) {
                v8b b;
                memcpy(&b, p0 + x * in_px, 4);
                memcpy((uint8_t *)&b + 4, p1 + x * in_px, 4);
                acc += __builtin_convertvector(b, v8i) * k[x];
            }
            int32_t lanes[8];
            memcpy(lanes, &acc, sizeof lanes);
            store_px(d0 + xx * 3, lanes);
            if (y + 1 < y1) {
                store_px(d0 + dst_stride + xx * 3, lanes + 4);
            }
        }
    }
}

#ifdef FRT_X86
// Weights for horizontal_avx2: per output pixel taps rounded up to even (zero-padded), each weight
// repeated for the 4 lanes of a pixel, so two consecutive pixels meet their two weights in one load.
static int32_t *expand4(const Axis *ax, int *taps2) {
    *taps2 = (ax->taps + 1) & ~1;
    int32_t *k4 = calloc((size_t)ax->out_size * *taps2 * 4, sizeof(int32_t));
    if (!k4) {
        return NULL;
    }
    for (int xx = 0; xx < ax->out_size; xx++) {
        for (int x = 0; x < ax->taps; x++) {
            for (int c = 0; c < 4; c++) {
                k4[((size_t)xx * *taps2 + x) * 4 + c] = ax->k[(size_t)xx * ax->taps + x];
            }
        }
    }
    return k4;
}

// Two neighbouring pixels, zero-extended to 8 x int32 (R G B X R G B X).
__attribute__((target("avx2"))) static inline __m256i pixel_pair(const uint8_t *p, int in_px, __m128i spread) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    if (in_px == 3) {
        b = _mm_shuffle_epi8(b, spread);
    }
    return _mm256_cvtepu8_epi32(b);
}

// Sum of the two 128-bit halves of acc, rounded to uint8 like frt_clip8 (>> 22 lands in [-512, 511], so the
// saturating packs clamp exactly), stored as 3 bytes.
__attribute__((target("avx2"))) static inline void store_rgb(uint8_t *out, __m256i acc) {
    __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    sum = _mm_srai_epi32(sum, FRT_PRECISION_BITS);
    sum = _mm_packus_epi16(_mm_packs_epi32(sum, sum), sum);
    uint32_t rgbx = (uint32_t)_mm_cvtsi128_si32(sum);
    memcpy(out, &rgbx, 3);
}

// Horizontal pass, AVX2: two taps per multiply-add, two rows sharing each weight load.
__attribute__((target("avx2"))) static void horizontal_avx2(const uint8_t *src, Py_ssize_t src_stride, int in_px,
                                                            int y0, int y1, const Axis *ax, const int32_t *k4,
                                                            int taps2, uint8_t *dst, Py_ssize_t dst_stride) {
    const __m128i spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 0, 0, 0, 0, 0, 0, 0, 0);
    // the rounding half goes in once: the two 128-bit halves are summed at the end
    const __m256i half = _mm256_setr_epi32(HALF, HALF, HALF, HALF, 0, 0, 0, 0);
    for (int y = y0; y < y1; y += 2) {
        const int two = y + 1 < y1;
        const uint8_t *r0 = src + y * src_stride;
        const uint8_t *r1 = two ? r0 + src_stride : r0;  // odd tail: the last row twice, stored once
        uint8_t *d0 = dst + (Py_ssize_t)(y - y0) * dst_stride;
        for (int xx = 0; xx < ax->out_size; xx++) {
            const int first = ax->bounds[2 * xx], pairs = (ax->bounds[2 * xx + 1] + 1) / 2;
            const __m256i *k = (const __m256i *)(k4 + (size_t)xx * taps2 * 4);
            const uint8_t *p0 = r0 + (Py_ssize_t)first * in_px;
            const uint8_t *p1 = r1 + (Py_ssize_t)first * in_px;
            __m256i acc0 = half, acc1 = half;
            for (int i = 0; i < pairs; i++) {
                const __m256i w = _mm256_loadu_si256(k + i);
                acc0 = _mm256_add_epi32(acc0, _mm256_mullo_epi32(pixel_pair(p0 + 2 * i * in_px, in_px, spread), w));
                acc1 = _mm256_add_epi32(acc1, _mm256_mullo_epi32(pixel_pair(p1 + 2 * i * in_px, in_px, spread), w));
            }
            store_rgb(d0 + xx * 3, acc0);
            if (two) {
                store_rgb(d0 + dst_stride + xx * 3, acc1);
            }
        }
    }
}
#endif

// Vertical pass: output row yy = weighted sum of src rows (bytes [0, row_bytes) of each, the same
// layout in and out, so the padding byte of RGBX rows is resampled along and ignored).
FRT_CLONES
static void vertical(const uint8_t *src, Py_ssize_t src_stride, Py_ssize_t row_bytes, const Axis *ax, uint8_t *dst,
                     Py_ssize_t dst_stride) {
    const int taps = ax->taps;
    for (int yy = 0; yy < ax->out_size; yy++) {
        const int first = ax->bounds[2 * yy], count = ax->bounds[2 * yy + 1];
        const int32_t *k = ax->k + (size_t)yy * taps;
        const uint8_t *rows = src + (Py_ssize_t)first * src_stride;
        uint8_t *out = dst + (Py_ssize_t)yy * dst_stride;
        Py_ssize_t j0 = 0;
        for (; j0 + VBLOCK <= row_bytes; j0 += VBLOCK) {
            int32_t acc[VBLOCK];
            for (int j = 0; j < VBLOCK; j++) {
                acc[j] = HALF;
            }
            for (int y = 0; y < count; y++) {
                const uint8_t *row = rows + y * src_stride + j0;
                const int32_t w = k[y];
                for (int j = 0; j < VBLOCK; j++) {
                    acc[j] += row[j] * w;
                }
            }
            for (int j = 0; j < VBLOCK; j++) {
                out[j0 + j] = frt_clip8(acc[j]);
            }
        }
        for (Py_ssize_t j = j0; j < row_bytes; j++) {
            int32_t acc = HALF;
            for (int y = 0; y < count; y++) {
                acc += rows[y * src_stride + j] * k[y];
            }
            out[j] = frt_clip8(acc);
        }
    }
}

static void horizontal_rows(const uint8_t *src, Py_ssize_t src_stride, int in_px, int y0, int y1, const Axis *ax,
                            const int32_t *k4, int taps2, uint8_t *dst, Py_ssize_t dst_stride) {
#ifdef FRT_X86
    if (k4) {
        horizontal_avx2(src, src_stride, in_px, y0, y1, ax, k4, taps2, dst, dst_stride);
        return;
    }
#else
    (void)k4;  // the AVX2 weight layout exists on x86-64 only
    (void)taps2;
#endif
    horizontal_generic(src, src_stride, in_px, y0, y1, ax, dst, dst_stride);
}

// Horizontal pass of rows [y0, y1) of src into RGB rows 0.. of dst. Rows that end within SLACK bytes
// of the buffer's end are resampled from a zero-padded copy (pad_row: in_w * in_px + SLACK bytes).
static void horizontal(const uint8_t *src, Py_ssize_t src_len, Py_ssize_t src_stride, int in_px, int in_w, int y0,
                       int y1, const Axis *ax, const int32_t *k4, int taps2, uint8_t *dst, Py_ssize_t dst_stride,
                       uint8_t *pad_row) {
    int safe_end = y1;
    while (safe_end > y0 && (Py_ssize_t)(safe_end - 1) * src_stride + (Py_ssize_t)in_w * in_px + SLACK > src_len) {
        safe_end--;
    }
    horizontal_rows(src, src_stride, in_px, y0, safe_end, ax, k4, taps2, dst, dst_stride);
    for (int y = safe_end; y < y1; y++) {
        memcpy(pad_row, src + (Py_ssize_t)y * src_stride, (size_t)in_w * in_px);
        horizontal_rows(pad_row, 0, in_px, 0, 1, ax, k4, taps2, dst + (Py_ssize_t)(y - y0) * dst_stride, dst_stride);
    }
}

PyDoc_STRVAR(resize_doc,
             "resize(src, offset, row_stride, pixel_bytes, width, height, dst, out_width, out_height, "
             "vertical_first, portable=False)\n\n"
             "Pillow-exact BICUBIC resize of the width x height RGB image at byte `offset` of buffer `src`\n"
             "(rows `row_stride` bytes apart, pixels `pixel_bytes` = 3 (RGB) or 4 (RGBX) apart) into the\n"
             "C-contiguous out_height x out_width x 3 uint8 buffer `dst`, first along the vertical axis if\n"
             "`vertical_first`. `portable` forces the loops non-AVX2 machines run (for tests).");

static PyObject *resize(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer src, dst;
    Py_ssize_t offset, row_stride;
    int in_px, width, height, out_w, out_h, vertical_first, portable = 0;
    if (!PyArg_ParseTuple(args, "y*nniiiw*iip|p", &src, &offset, &row_stride, &in_px, &width, &height, &dst, &out_w,
                          &out_h, &vertical_first, &portable)) {
        return NULL;
    }
    PyObject *result = NULL;
    Axis ax_h = {0}, ax_v = {0};
    uint8_t *tmp = NULL, *pad_row = NULL;
    int32_t *k4 = NULL;
    if (in_px != 3 && in_px != 4) {
        PyErr_Format(PyExc_ValueError, "pixel_bytes must be 3 or 4, got %d", in_px);
        goto done;
    }
    if (width <= 0 || height <= 0 || out_w <= 0 || out_h <= 0) {
        PyErr_Format(PyExc_ValueError, "sizes must be positive: %dx%d -> %dx%d", width, height, out_w, out_h);
        goto done;
    }
    if (offset < 0 || row_stride < (Py_ssize_t)width * in_px ||
        offset + (Py_ssize_t)(height - 1) * row_stride + (Py_ssize_t)width * in_px > src.len) {
        PyErr_Format(PyExc_ValueError, "a %dx%d image at offset %zd, row stride %zd does not fit a %zd-byte buffer",
                     width, height, offset, row_stride, src.len);
        goto done;
    }
    if (dst.len != (Py_ssize_t)out_w * out_h * 3) {
        PyErr_Format(PyExc_ValueError, "dst holds %zd bytes, a %dx%d RGB image needs %zd", dst.len, out_w, out_h,
                     (Py_ssize_t)out_w * out_h * 3);
        goto done;
    }
    const uint8_t *in = (const uint8_t *)src.buf + offset;
    const Py_ssize_t in_len = src.len - offset;
    uint8_t *out = dst.buf;
    const int need_h = out_w != width, need_v = out_h != height;
    const Py_ssize_t out_stride = (Py_ssize_t)out_w * 3;
    int taps2 = 0;
    if ((need_h && axis_init(&ax_h, width, out_w)) || (need_v && axis_init(&ax_v, height, out_h)) ||
        !(pad_row = calloc((size_t)width * in_px + SLACK, 1))) {
        goto no_memory;
    }
#ifdef FRT_X86
    if (need_h && !portable && __builtin_cpu_supports("avx2") && !(k4 = expand4(&ax_h, &taps2))) {
        goto no_memory;
    }
#endif
    // the first pass's output: with the source's pixel layout when vertical first, RGB otherwise;
    // Pillow's horizontal-first pass only resamples the source rows the vertical pass reads
    int y_first = 0, y_last = height;
    Py_ssize_t tmp_stride = 0, tmp_len = 0;
    if (need_v && need_h && vertical_first) {
        tmp_stride = (Py_ssize_t)width * in_px;
        tmp_len = tmp_stride * out_h + SLACK;
    } else if (need_v && need_h) {
        y_first = ax_v.bounds[0];
        y_last = ax_v.bounds[2 * (out_h - 1)] + ax_v.bounds[2 * (out_h - 1) + 1];
        for (int yy = 0; yy < out_h; yy++) {
            ax_v.bounds[2 * yy] -= y_first;
        }
        tmp_stride = out_stride;
        tmp_len = tmp_stride * (y_last - y_first);
    } else if (need_v && in_px == 4) {
        tmp_stride = (Py_ssize_t)width * 4;
        tmp_len = tmp_stride * out_h;
    }
    if (tmp_len && !(tmp = malloc((size_t)tmp_len))) {
        goto no_memory;
    }
    Py_BEGIN_ALLOW_THREADS;
    if (need_h && need_v && vertical_first) {
        vertical(in, row_stride, tmp_stride, &ax_v, tmp, tmp_stride);
        horizontal(tmp, tmp_len, tmp_stride, in_px, width, 0, out_h, &ax_h, k4, taps2, out, out_stride, pad_row);
    } else if (need_h && need_v) {
        horizontal(in, in_len, row_stride, in_px, width, y_first, y_last, &ax_h, k4, taps2, tmp, tmp_stride, pad_row);
        vertical(tmp, tmp_stride, tmp_stride, &ax_v, out, out_stride);
    } else if (need_h) {
        horizontal(in, in_len, row_stride, in_px, width, 0, height, &ax_h, k4, taps2, out, out_stride, pad_row);
    } else if (need_v && in_px == 3) {
        vertical(in, row_stride, out_stride, &ax_v, out, out_stride);
    } else if (need_v) {
        vertical(in, row_stride, tmp_stride, &ax_v, tmp, tmp_stride);
        for (Py_ssize_t i = 0; i < (Py_ssize_t)width * out_h; i++) {
            memcpy(out + i * 3, tmp + i * 4, 3);
        }
    } else {
        for (int y = 0; y < height; y++) {
            for (int x = 0; x < width; x++) {
                memcpy(out + y * out_stride + x * 3, in + y * row_stride + x * in_px, 3);
            }
        }
    }
    Py_END_ALLOW_THREADS;
    result = Py_NewRef(Py_None);
    goto done;
no_memory:
    PyErr_NoMemory();
done:
    free(tmp);
    free(pad_row);
    free(k4);
    free(ax_h.table);
    free(ax_v.table);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"resize", resize, METH_VARARGS, resize_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_resample", "Pillow-exact vectorised BICUBIC resampling of 8-bit RGB.", -1, methods,
};

PyMODINIT_FUNC PyInit__resample(void) { return PyModule_Create(&module); }
