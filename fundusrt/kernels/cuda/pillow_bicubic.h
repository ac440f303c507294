// Pillow's BICUBIC weights and rounding, shared by the CUDA kernels (patchify.cu, also built for the
// host by patchify_host.cpp) and the CPU resampler (fundusrt/kernels/_resample.c), so that every path
// computes the same fixed-point weights from one definition.
//
// Pillow's ImagingResample (libImaging/Resample.c, unchanged from Pillow 7 to 13), per axis:
// precompute_coeffs (bicubic a = -0.5, support 2 scaled by the downscale factor so downscaling
// antialiases, window bounds rounded with (int)(x + 0.5), weights normalised per output pixel, in
// double) then normalize_coeffs_8bpc (22 fractional bits). Valid C99 and CUDA C++; the includer
// provides ceil() (<math.h> on the host, built in under NVRTC) and must not let the compiler contract
// the double arithmetic into FMA (-ffp-contract=off, --fmad=false), as Pillow's x86-64 build does not.
#ifndef FRT_PILLOW_BICUBIC_H
#define FRT_PILLOW_BICUBIC_H

#ifndef __CUDACC__
#define __host__
#define __device__
#endif

#define FRT_PRECISION_BITS 22  // Pillow: 32 - 8 - 2 (8 result bits, 2 bits of head-room for overshoot)

// An axis table: [out_size, stride, (first, count) * out_size, coeff * out_size * stride].
#define FRT_TABLE_HEADER 2

// Pillow's bicubic_filter with a = -0.5.
static inline __host__ __device__ double frt_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
}

// Pillow's ksize: the most taps one output pixel can use when resampling in_size -> out_size.
static inline __host__ __device__ int frt_max_taps(int in_size, int out_size) {
    double scale = (double)(float)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    return (int)ceil(2.0 * filterscale) * 2 + 1;
}

// Pillow precompute_coeffs + normalize_coeffs_8bpc for output index `out_index` of one axis.
// Writes (first, count) and `stride` fixed-point weights (zeros past count) into `table`.
static inline __host__ __device__ void frt_axis_coeffs_at(int in_size, int out_size, int stride, int out_index,
                                                          int* table) {
    // Pillow casts the float box extent to double; in0 is always 0 here (the ROI is a pointer offset).
    double scale = (double)((float)in_size - 0.0f) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    double center = 0.0 + (out_index + 0.5) * scale;
    double ss = 1.0 / filterscale;
    int xmin = (int)(center - support + 0.5);
    if (xmin < 0) {
        xmin = 0;
    }
    int xmax = (int)(center + support + 0.5);
    if (xmax > in_size) {
        xmax = in_size;
    }
    int count = xmax - xmin;
    if (count > stride) {
        count = stride;  // cannot happen when stride == frt_max_taps; guards the table bounds
    }
    // Two passes instead of a per-thread weight array: the weights are recomputed bit-identically.
    double ww = 0.0;
    for (int x = 0; x < count; x++) {
        ww += frt_bicubic((x + xmin - center + 0.5) * ss);
    }
    int* bounds = table + FRT_TABLE_HEADER + 2 * out_index;
    bounds[0] = xmin;
    bounds[1] = count;
    int* k = table + FRT_TABLE_HEADER + 2 * out_size + out_index * stride;
    for (int x = 0; x < stride; x++) {
        double w = 0.0;
        if (x < count) {
            w = frt_bicubic((x + xmin - center + 0.5) * ss);
            if (ww != 0.0) {
                w /= ww;
            }
        }
        k[x] = w < 0 ? (int)(-0.5 + w * (1 << FRT_PRECISION_BITS)) : (int)(0.5 + w * (1 << FRT_PRECISION_BITS));
    }
    if (out_index == 0) {
        table[0] = out_size;
        table[1] = stride;
    }
}

// Pillow clip8: drop the fraction bits (arithmetic shift) and saturate to 0..255.
static inline __host__ __device__ unsigned char frt_clip8(int acc) {
    int v = acc >> FRT_PRECISION_BITS;
    return (unsigned char)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

#endif  // FRT_PILLOW_BICUBIC_H
