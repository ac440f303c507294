// fundusrt CUDA kernels: adaptive-resolution patching and fundus ROI detection.
//
// Section 1 holds every piece of per-pixel arithmetic as __host__ __device__ functions with no CUDA
// dependency, so the test suite compiles the very same code with g++ (see patchify_host.cpp) and
// compares it with PIL. Section 2 holds the __global__ kernels, which only map thread indices onto
// those functions. Compiled by NVRTC at run time (fundusrt/kernels/cuda_patchify.py) or by nvcc into
// a fatbin; NVRTC must be given --fmad=false so that double/float arithmetic rounds exactly like the
// host build (and like Pillow on x86-64, which does not contract into FMA).
//
// Resampling reproduces Pillow's ImagingResample for 8-bit RGB with the weights of pillow_bicubic.h:
// the first pass (horizontal, or vertical where Pillow 13 picks that order) rounds to a uint8
// intermediate that the second pass reads. Integer accumulation makes the result bit-identical to
// Pillow whenever the double coefficients are.

#include "pillow_bicubic.h"

// ---------------------------------------------------------------------------------------------
// Section 1: portable arithmetic (host and device)
// ---------------------------------------------------------------------------------------------

// Layout of one row of the views table (int32), built by cuda_patchify.build_launch_tables.
#define FRT_VIEW_SRC_X0 0   // ROI crop origin in the input image
#define FRT_VIEW_SRC_Y0 1
#define FRT_VIEW_SRC_W 2    // ROI crop size = resampling input size
#define FRT_VIEW_SRC_H 3
#define FRT_VIEW_OUT_W 4    // resize_to
#define FRT_VIEW_OUT_H 5
#define FRT_VIEW_PASTE_X 6  // paste_at on the canvas
#define FRT_VIEW_PASTE_Y 7
#define FRT_VIEW_H_TABLE 8  // offset (ints) of the horizontal axis table in the tables buffer
#define FRT_VIEW_V_TABLE 9  // offset (ints) of the vertical axis table
#define FRT_VIEW_TMP 10     // offset (bytes) of this view's intermediate buffer
#define FRT_VIEW_VFIRST 11  // 1: vertical pass first (intermediate src_w x out_h), 0: horizontal first (out_w x src_h)
#define FRT_VIEW_FIELDS 12

// A coefficient job (int32 x 4): in_size, out_size, stride, table offset (ints).
#define FRT_JOB_FIELDS 4

// A tile (int32 x 3): view index, canvas x0, canvas y0 of its box.
#define FRT_TILE_FIELDS 3

// One tap-weighted sum of `count` RGB pixels `step` bytes apart, rounded like Pillow.
__host__ __device__ inline void frt_filter_rgb(const unsigned char* first, long long step, const int* k, int count,
                                               unsigned char* rgb) {
    int s0 = 1 << (FRT_PRECISION_BITS - 1);
    int s1 = s0;
    int s2 = s0;
    for (int i = 0; i < count; i++) {
        const unsigned char* p = first + i * step;
        s0 += p[0] * k[i];
        s1 += p[1] * k[i];
        s2 += p[2] * k[i];
    }
    rgb[0] = frt_clip8(s0);
    rgb[1] = frt_clip8(s1);
    rgb[2] = frt_clip8(s2);
}

// Width of a view's intermediate image (the first pass resamples one axis, keeps the other).
__host__ __device__ inline int frt_tmp_width(const int* view) {
    return view[FRT_VIEW_VFIRST] ? view[FRT_VIEW_SRC_W] : view[FRT_VIEW_OUT_W];
}

__host__ __device__ inline int frt_tmp_height(const int* view) {
    return view[FRT_VIEW_VFIRST] ? view[FRT_VIEW_OUT_H] : view[FRT_VIEW_SRC_H];
}

// The taps of output index `index` in an axis table: first source index, count, weights.
__host__ __device__ inline const int* frt_taps(const int* table, int index, int* first, int* count) {
    *first = table[FRT_TABLE_HEADER + 2 * index];
    *count = table[FRT_TABLE_HEADER + 2 * index + 1];
    return table + FRT_TABLE_HEADER + 2 * table[0] + index * table[1];
}

// First pass: intermediate pixel (x, y) of a view, resampled from its ROI crop of the image.
// Pillow keeps only the rows/columns the second pass reads; the values of those are identical.
__host__ __device__ inline void frt_first_pass_pixel(const unsigned char* image, int image_w, const int* view,
                                                     const int* tables, unsigned char* tmp, int x, int y) {
    int first, count;
    const unsigned char* src = image + ((long long)view[FRT_VIEW_SRC_Y0] * image_w + view[FRT_VIEW_SRC_X0]) * 3;
    const int* k;
    long long step;
    if (view[FRT_VIEW_VFIRST]) {
        k = frt_taps(tables + view[FRT_VIEW_V_TABLE], y, &first, &count);
        src += ((long long)first * image_w + x) * 3;
        step = (long long)image_w * 3;
    } else {
        k = frt_taps(tables + view[FRT_VIEW_H_TABLE], x, &first, &count);
        src += ((long long)y * image_w + first) * 3;
        step = 3;
    }
    unsigned char* dst = tmp + view[FRT_VIEW_TMP] + ((long long)y * frt_tmp_width(view) + x) * 3;
    frt_filter_rgb(src, step, k, count, dst);
}

// Second pass + canvas: the RGB value of canvas pixel (cx, cy) of a view (pad outside the
// pasted resized image).
__host__ __device__ inline void frt_canvas_pixel(const int* view, const int* tables, const unsigned char* tmp,
                                                 int cx, int cy, const unsigned char* pad, unsigned char* rgb) {
    int ix = cx - view[FRT_VIEW_PASTE_X];
    int iy = cy - view[FRT_VIEW_PASTE_Y];
    if (ix < 0 || iy < 0 || ix >= view[FRT_VIEW_OUT_W] || iy >= view[FRT_VIEW_OUT_H]) {
        rgb[0] = pad[0];
        rgb[1] = pad[1];
        rgb[2] = pad[2];
        return;
    }
    int first, count;
    int tmp_w = frt_tmp_width(view);
    const unsigned char* src = tmp + view[FRT_VIEW_TMP];
    const int* k;
    long long step;
    if (view[FRT_VIEW_VFIRST]) {
        k = frt_taps(tables + view[FRT_VIEW_H_TABLE], ix, &first, &count);
        src += ((long long)iy * tmp_w + first) * 3;
        step = 3;
    } else {
        k = frt_taps(tables + view[FRT_VIEW_V_TABLE], iy, &first, &count);
        src += ((long long)first * tmp_w + ix) * 3;
        step = (long long)tmp_w * 3;
    }
    frt_filter_rgb(src, step, k, count, rgb);
}

// Normalised value of channel `channel` at uint8 level v: lut holds (v / 255 - mean) / std per
// channel (3 x 256, float32 or float16 bits), the CPU path's own table, so both paths agree bit for bit.
template <typename OutT>
__host__ __device__ inline OutT frt_normalize(const OutT* lut, int channel, unsigned char v) {
    return lut[channel * 256 + v];
}

// --- fundus ROI (fundusrt/kernels/roi.py) ----------------------------------------------------
// The GPU only gathers image[::step, ::step]; roi.roi_from_sample decides the box on the host from
// that small copy, so both paths share one definition.

// Copies subsampled pixel (i, j), i.e. image pixel (i * step, j * step), into sample (rows x cols x 3).
__host__ __device__ inline void frt_roi_sample_pixel(const unsigned char* image, int image_w, int step, int cols,
                                                     int i, int j, unsigned char* sample) {
    const unsigned char* p = image + ((long long)i * step * image_w + (long long)j * step) * 3;
    unsigned char* q = sample + ((long long)i * cols + j) * 3;
    q[0] = p[0];
    q[1] = p[1];
    q[2] = p[2];
}

#ifdef __CUDACC__
// ---------------------------------------------------------------------------------------------
// Section 2: kernels
// ---------------------------------------------------------------------------------------------

// Fills every axis table; grid (ceil(max out_size / blockDim.x), num_jobs).
extern "C" __global__ void frt_axis_coeffs(const int* jobs, int* tables) {
    const int* job = jobs + blockIdx.y * FRT_JOB_FIELDS;
    int out_index = blockIdx.x * blockDim.x + threadIdx.x;
    if (out_index < job[1]) {
        frt_axis_coeffs_at(job[0], job[1], job[2], out_index, tables + job[3]);
    }
}

// First resampling pass of every view; grid (ceil(max tmp width / blockDim.x), max tmp height, num_views).
extern "C" __global__ void frt_first_pass(const unsigned char* image, int image_w, const int* views,
                                          const int* tables, unsigned char* tmp) {
    const int* view = views + blockIdx.z * FRT_VIEW_FIELDS;
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y;
    if (x < frt_tmp_width(view) && y < frt_tmp_height(view)) {
        frt_first_pass_pixel(image, image_w, view, tables, tmp, x, y);
    }
}

// Second pass, padding, normalisation and NCHW layout of every tile; grid
// (ceil(S / blockDim.x), ceil(S / blockDim.y), num_tiles). OutT is float or unsigned short (fp16 bits).
template <typename OutT>
__device__ inline void frt_tiles(const int* views, const int* tables, const unsigned char* tmp, const int* tiles,
                                 int tile_size, int pad_rgb, const OutT* lut, OutT* out) {
    int tx = blockIdx.x * blockDim.x + threadIdx.x;
    int ty = blockIdx.y * blockDim.y + threadIdx.y;
    if (tx >= tile_size || ty >= tile_size) {
        return;
    }
    const int* tile = tiles + blockIdx.z * FRT_TILE_FIELDS;
    const int* view = views + tile[0] * FRT_VIEW_FIELDS;
    unsigned char pad[3] = {(unsigned char)(pad_rgb & 255), (unsigned char)((pad_rgb >> 8) & 255),
                            (unsigned char)((pad_rgb >> 16) & 255)};
    unsigned char rgb[3];
    frt_canvas_pixel(view, tables, tmp, tile[1] + tx, tile[2] + ty, pad, rgb);
    long long plane = (long long)tile_size * tile_size;
    long long at = (long long)blockIdx.z * 3 * plane + (long long)ty * tile_size + tx;
    out[at] = frt_normalize(lut, 0, rgb[0]);
    out[at + plane] = frt_normalize(lut, 1, rgb[1]);
    out[at + 2 * plane] = frt_normalize(lut, 2, rgb[2]);
}

extern "C" __global__ void frt_tiles_f32(const int* views, const int* tables, const unsigned char* tmp,
                                         const int* tiles, int tile_size, int pad_rgb, const float* lut,
                                         float* out) {
    frt_tiles(views, tables, tmp, tiles, tile_size, pad_rgb, lut, out);
}

// fp16 output as raw bits: the table already holds binary16 values, so no conversion code is needed.
extern "C" __global__ void frt_tiles_f16(const int* views, const int* tables, const unsigned char* tmp,
                                         const int* tiles, int tile_size, int pad_rgb, const unsigned short* lut,
                                         unsigned short* out) {
    frt_tiles(views, tables, tmp, tiles, tile_size, pad_rgb, lut, out);
}

// image[::step, ::step] into sample (rows x cols x 3); grid (ceil(cols / 32), ceil(rows / blockDim.y)),
// block (32, y).
extern "C" __global__ void frt_roi_sample(const unsigned char* image, int image_w, int step, int rows, int cols,
                                          unsigned char* sample) {
    int j = blockIdx.x * 32 + threadIdx.x;
    int i = blockIdx.y * blockDim.y + threadIdx.y;
    if (i < rows && j < cols) {
        frt_roi_sample_pixel(image, image_w, step, cols, i, j, sample);
    }
}
#endif  // __CUDACC__
