/* Per-pixel CIEDE2000 between two 8-bit sRGB images, fused: table linearisation, sRGB -> XYZ -> CIELAB (skimage's
 * D65 / 2 degree definitions) and the CIEDE2000 formula (Sharma, Wu & Dalal 2005, kL = kC = kH = 1) in one pass over
 * the pixels, float32, no temporaries. The same algebra as factory/color.py's `_fast_ciede2000` (hue terms from the
 * a'b' unit vectors: 1 atan2, 1 exp, 1 sin per pixel); written branch-free so that GCC vectorises the loop with
 * glibc's vector maths library (libmvec: cbrtf, atan2f, expf, sinf) under -O3 -ffast-math -fopenmp-simd.
 *
 * table: (3 channels, 3 XYZ rows, 256 levels) float32, the linear value of each 8-bit level times the
 *        sRGB -> XYZ matrix entry divided by the white point (built in factory/native/__init__.py).
 * first, second: (3, pixels) uint8 planes (one image of an (N, 3, H, W) tensor); out: (pixels,) float32.
 */
#include <math.h>
#include <stdint.h>

static inline float lab_f(float t) {
    /* skimage: t^(1/3) above 0.008856, else 7.787 t + 16/116; both computed, one kept (no branch). */
    float cube = cbrtf(fmaxf(t, 0.008856f));
    float linear = 7.787f * t + 16.0f / 116.0f;
    return t > 0.008856f ? cube : linear;
}

static inline float chroma_weight(float c) {
    /* sqrt(C^7 / (C^7 + 25^7)) */
    float c2 = c * c, c7 = c2 * c2 * c2 * c;
    return sqrtf(c7 / (c7 + 6103515625.0f));
}

void ciede2000_u8(const uint8_t *first, const uint8_t *second, int64_t pixels, const float *table, float *out) {
    const float *tr = table, *tg = table + 3 * 256, *tb = table + 6 * 256;
    const float cos30 = 0.8660254037844387f, sin30 = 0.5f;
    const float cos6 = 0.9945218953682733f, sin6 = 0.10452846326765347f;
    const float cos63 = 0.45399049973954675f, sin63 = 0.8910065241883679f;
    const float cos275 = 0.08715574274765817f, sin275 = -0.9961946980917455f;
    const float rad85 = 1.4835298641951802f, inv_rad25 = 2.2918311805232930f, rad60 = 1.0471975511965976f;
#pragma omp simd
    for (int64_t i = 0; i < pixels; i++) {
        int r1 = first[i], g1 = first[pixels + i], b1 = first[2 * pixels + i];
        int r2 = second[i], g2 = second[pixels + i], b2 = second[2 * pixels + i];
        float fx1 = lab_f(tr[r1] + tg[g1] + tb[b1]);
        float fy1 = lab_f(tr[256 + r1] + tg[256 + g1] + tb[256 + b1]);
        float fz1 = lab_f(tr[512 + r1] + tg[512 + g1] + tb[512 + b1]);
        float fx2 = lab_f(tr[r2] + tg[g2] + tb[b2]);
        float fy2 = lab_f(tr[256 + r2] + tg[256 + g2] + tb[256 + b2]);
        float fz2 = lab_f(tr[512 + r2] + tg[512 + g2] + tb[512 + b2]);
        float l1 = 116.0f * fy1 - 16.0f, a1 = 500.0f * (fx1 - fy1), bb1 = 200.0f * (fy1 - fz1);
        float l2 = 116.0f * fy2 - 16.0f, a2 = 500.0f * (fx2 - fy2), bb2 = 200.0f * (fy2 - fz2);

        /* a' = (1 + G) a, G from the mean unprimed chroma. */
        float mean_chroma = 0.5f * (sqrtf(a1 * a1 + bb1 * bb1) + sqrtf(a2 * a2 + bb2 * bb2));
        float scale = 1.5f - 0.5f * chroma_weight(mean_chroma);
        a1 *= scale;
        a2 *= scale;
        float c1 = sqrtf(a1 * a1 + bb1 * bb1), c2 = sqrtf(a2 * a2 + bb2 * bb2);
        /* Unit hue vectors, zero for a gray colour (C' = 0). */
        float inv1 = c1 > 0.0f ? 1.0f / c1 : 0.0f, inv2 = c2 > 0.0f ? 1.0f / c2 : 0.0f;
        float u1 = a1 * inv1, v1 = bb1 * inv1, u2 = a2 * inv2, v2 = bb2 * inv2;
        float mean_c = 0.5f * (c1 + c2);

        float dl = 0.5f * (l1 + l2) - 50.0f;
        dl *= dl;
        float lightness_term = (l2 - l1) / (1.0f + 0.015f * dl / sqrtf(20.0f + dl));
        float chroma_term = (c2 - c1) / (1.0f + 0.045f * mean_c);

        /* dH' = 2 sqrt(C1' C2') sin(dh'/2) = sqrt(C1' C2') |u1 - u2|, signed like u1 x u2. */
        float chord = (u2 - u1) * (u2 - u1) + (v2 - v1) * (v2 - v1);
        float cross = u1 * v2 - v1 * u2;
        float dh = copysignf(sqrtf(chord * c1 * c2), cross);

        /* Mean hue direction: u1 + u2, or the lower hue turned by +90 degrees when they are exactly opposite. */
        float su = u1 + u2, sv = v1 + v2;
        float norm2 = su * su + sv * sv;
        float turn = (v1 > 0.0f || (v1 == 0.0f && u1 > 0.0f)) ? 1.0f : -1.0f;
        su = norm2 > 0.0f ? su : -turn * v1;
        sv = norm2 > 0.0f ? sv : turn * u1;
        norm2 = su * su + sv * sv;
        float inv_norm = norm2 > 0.0f ? 1.0f / sqrtf(norm2) : 0.0f;
        float ch = su * inv_norm, sh = sv * inv_norm;
        /* With two gray colours the mean hue is (0 + 0) / 2 = 0 degrees: its direction is (1, 0). */
        ch = norm2 > 0.0f ? ch : 1.0f;

        float c2h = ch * ch - sh * sh, s2h = 2.0f * ch * sh;
        float c3h = ch * c2h - sh * s2h, s3h = sh * c2h + ch * s2h;
        float c4h = c2h * c2h - s2h * s2h, s4h = 2.0f * c2h * s2h;
        float t = 1.0f - 0.17f * (ch * cos30 + sh * sin30) + 0.24f * c2h + 0.32f * (c3h * cos6 - s3h * sin6) -
                  0.20f * (c4h * cos63 + s4h * sin63);
        float hue_term = dh / (1.0f + 0.015f * mean_c * t);

        /* H' - 275 degrees, wrapped to (-180, 180]; the Gaussian is zero where it wrapped (H' below 95 degrees). */
        float from275 = atan2f(sh * cos275 - ch * sin275, ch * cos275 + sh * sin275);
        float x = from275 * inv_rad25;
        float gaussian = from275 < rad85 ? expf(-x * x) : 0.0f;
        float rotation = -2.0f * chroma_weight(mean_c) * sinf(rad60 * gaussian);

        float squared = lightness_term * lightness_term + chroma_term * chroma_term + hue_term * hue_term +
                        rotation * chroma_term * hue_term;
        out[i] = sqrtf(fmaxf(squared, 0.0f));
    }
}
