// Host build of patchify.cu's arithmetic, for tests on machines without a GPU.
//
// Runs each kernel's thread-index loop on the CPU, calling the same __host__ __device__ functions the
// kernels call, over the same launch tables the Python launcher builds. Usage:
//   patchify_host patchify IN OUT   IN: int32 header[10] (image_h, image_w, num_views, num_jobs,
//                                   num_tiles, tile_size, table_ints, tmp_bytes, pad_rgb, 0), float32
//                                   lut[768], uint16 lut[768] (fp16 bits), int32 views, jobs, tiles,
//                                   uint8 image (HWC).
//                                   OUT: uint8 tiles (N,3,S,S), float32 normalised, uint16 fp16 bits.
//   patchify_host roi IN OUT        IN: int32 header[4] (image_h, image_w, step, 0), uint8 image.
//                                   OUT: uint8 sample image[::step, ::step] (HWC), what roi_from_sample reads.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "patchify.cu"

namespace {

std::vector<unsigned char> read_file(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (!f) {
        std::fprintf(stderr, "cannot open %s\n", path);
        std::exit(2);
    }
    std::vector<unsigned char> data;
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) {
        data.insert(data.end(), buf, buf + n);
    }
    std::fclose(f);
    return data;
}

void write_file(const char* path, const std::vector<const void*>& parts, const std::vector<size_t>& sizes) {
    FILE* f = std::fopen(path, "wb");
    if (!f) {
        std::fprintf(stderr, "cannot write %s\n", path);
        std::exit(2);
    }
    for (size_t i = 0; i < parts.size(); i++) {
        std::fwrite(parts[i], 1, sizes[i], f);
    }
    std::fclose(f);
}

// Reads consecutive typed blocks out of the input file.
struct Reader {
    const std::vector<unsigned char>& data;
    size_t at = 0;
    template <typename T>
    const T* take(size_t count) {
        if (at + count * sizeof(T) > data.size()) {
            std::fprintf(stderr, "input truncated at byte %zu\n", at);
            std::exit(2);
        }
        const T* p = reinterpret_cast<const T*>(data.data() + at);
        at += count * sizeof(T);
        return p;
    }
};

int run_patchify(const char* in_path, const char* out_path) {
    std::vector<unsigned char> data = read_file(in_path);
    Reader in{data};
    const int* header = in.take<int>(10);
    int image_h = header[0], image_w = header[1], num_views = header[2], num_jobs = header[3];
    int num_tiles = header[4], tile_size = header[5], table_ints = header[6], tmp_bytes = header[7];
    const unsigned char pad[3] = {(unsigned char)(header[8] & 255), (unsigned char)((header[8] >> 8) & 255),
                                  (unsigned char)((header[8] >> 16) & 255)};
    const float* lut_f32 = in.take<float>(3 * 256);
    const unsigned short* lut_f16 = in.take<unsigned short>(3 * 256);
    const int* views = in.take<int>((size_t)num_views * FRT_VIEW_FIELDS);
    const int* jobs = in.take<int>((size_t)num_jobs * FRT_JOB_FIELDS);
    const int* tiles = in.take<int>((size_t)num_tiles * FRT_TILE_FIELDS);
    const unsigned char* image = in.take<unsigned char>((size_t)image_h * image_w * 3);

    std::vector<int> tables(table_ints, 0);
    for (int n = 0; n < num_jobs; n++) {  // frt_axis_coeffs
        const int* job = jobs + n * FRT_JOB_FIELDS;
        if (job[2] != frt_max_taps(job[0], job[1])) {
            std::fprintf(stderr, "job %d: stride %d != frt_max_taps(%d, %d) = %d\n", n, job[2], job[0], job[1],
                         frt_max_taps(job[0], job[1]));
            return 3;
        }
        for (int i = 0; i < job[1]; i++) {
            frt_axis_coeffs_at(job[0], job[1], job[2], i, tables.data() + job[3]);
        }
    }
    std::vector<unsigned char> tmp(tmp_bytes, 0);
    for (int v = 0; v < num_views; v++) {  // frt_first_pass
        const int* view = views + v * FRT_VIEW_FIELDS;
        for (int y = 0; y < frt_tmp_height(view); y++) {
            for (int x = 0; x < frt_tmp_width(view); x++) {
                frt_first_pass_pixel(image, image_w, view, tables.data(), tmp.data(), x, y);
            }
        }
    }
    size_t plane = (size_t)tile_size * tile_size;
    size_t total = (size_t)num_tiles * 3 * plane;
    std::vector<unsigned char> rgb_out(total);
    std::vector<float> f32_out(total);
    std::vector<unsigned short> f16_out(total);
    for (int t = 0; t < num_tiles; t++) {  // frt_tiles_f32 / frt_tiles_f16
        const int* tile = tiles + t * FRT_TILE_FIELDS;
        const int* view = views + tile[0] * FRT_VIEW_FIELDS;
        for (int ty = 0; ty < tile_size; ty++) {
            for (int tx = 0; tx < tile_size; tx++) {
                unsigned char rgb[3];
                frt_canvas_pixel(view, tables.data(), tmp.data(), tile[1] + tx, tile[2] + ty, pad, rgb);
                for (int c = 0; c < 3; c++) {
                    size_t at = ((size_t)t * 3 + c) * plane + (size_t)ty * tile_size + tx;
                    rgb_out[at] = rgb[c];
                    f32_out[at] = frt_normalize(lut_f32, c, rgb[c]);
                    f16_out[at] = frt_normalize(lut_f16, c, rgb[c]);
                }
            }
        }
    }
    write_file(out_path, {rgb_out.data(), f32_out.data(), f16_out.data()},
               {total, total * sizeof(float), total * sizeof(unsigned short)});
    return 0;
}

int run_roi(const char* in_path, const char* out_path) {
    std::vector<unsigned char> data = read_file(in_path);
    Reader in{data};
    const int* header = in.take<int>(4);
    int height = header[0], width = header[1], step = header[2];
    const unsigned char* image = in.take<unsigned char>((size_t)height * width * 3);
    int rows = (height + step - 1) / step;
    int cols = (width + step - 1) / step;
    std::vector<unsigned char> sample((size_t)rows * cols * 3);
    for (int i = 0; i < rows; i++) {  // frt_roi_sample
        for (int j = 0; j < cols; j++) {
            frt_roi_sample_pixel(image, width, step, cols, i, j, sample.data());
        }
    }
    write_file(out_path, {sample.data()}, {sample.size()});
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s patchify|roi IN OUT\n", argv[0]);
        return 2;
    }
    if (!std::strcmp(argv[1], "patchify")) return run_patchify(argv[2], argv[3]);
    if (!std::strcmp(argv[1], "roi")) return run_roi(argv[2], argv[3]);
    std::fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
