// Swin (shifted-)window attention: where each token of each window comes from, as index arithmetic.
//
// Shared by the CPU and CUDA kernels (the Triton kernels restate it in Python; the tests tie all of them
// to effvit/reference/window.py, which follows timm line by line). The official code materialises
//   roll(x, (-sh, -sw)) -> zero-pad right/bottom to (Hp, Wp) -> partition into wh x ww windows
// and the inverse on the way out; here a window token (window (wy, wx), token t) maps to
//   padded-shifted position (r, c) = (wy*wh + t / ww, wx*ww + t % ww),
//   input position ((r + sh) % H, (c + sw) % W) when r < H and c < W, else a padding token,
// whose qkv is the qkv Linear's bias (the official code pads x with zeros before that Linear).
#pragma once

#include <cstdint>

#include "macros.h"

namespace effvit {

constexpr float kSwinMaskValue = -100.0f;  // Swin's logit between tokens of different shift regions

struct WindowGeometry {
  int32_t B = 0, H = 0, W = 0;          // input map
  int32_t heads = 0, head_dim = 0;      // C = heads * head_dim; qkv has 3C channels (3, heads, head_dim)
  int32_t wh = 1, ww = 1, sh = 0, sw = 0;
  int32_t Hp = 0, Wp = 0;               // padded to multiples of the window
  int32_t nwh = 0, nww = 0;             // windows per column / per row
  int32_t N = 1;                        // tokens per window
  bool shifted = false;                 // any shift: the region mask applies

  EFFVIT_HOST_DEVICE int32_t C() const { return heads * head_dim; }
  EFFVIT_HOST_DEVICE int32_t windows_per_image() const { return nwh * nww; }
  EFFVIT_HOST_DEVICE int32_t table_rows() const { return (2 * wh - 1) * (2 * ww - 1); }

  // Row of the padded-shifted map that token t of window row wy sits on (and its column).
  EFFVIT_HOST_DEVICE int32_t row(int32_t wy, int32_t t) const { return wy * wh + t / ww; }
  EFFVIT_HOST_DEVICE int32_t col(int32_t wx, int32_t t) const { return wx * ww + t % ww; }

  // (v + s) mod n for 0 <= v < n, s >= 0: one subtraction in the usual case s <= n (a division costs tens of
  // cycles, on a CPU and a GPU alike).
  EFFVIT_HOST_DEVICE static int32_t wrap(int32_t v, int32_t s, int32_t n) {
    int32_t x = v + s;
    x = x >= n ? x - n : x;
    return x >= n ? x % n : x;
  }

  // The input row behind padded-shifted row r, or -1 for a padding row (and the column likewise).
  EFFVIT_HOST_DEVICE int32_t source_row(int32_t r) const { return r >= H ? -1 : wrap(r, sh, H); }
  EFFVIT_HOST_DEVICE int32_t source_col(int32_t c) const { return c >= W ? -1 : wrap(c, sw, W); }

  // The input pixel (flattened y * W + x) behind padded-shifted position (r, c), or -1 for padding.
  EFFVIT_HOST_DEVICE int32_t source_pixel(int32_t r, int32_t c) const {
    if (r >= H || c >= W) return -1;
    return wrap(r, sh, H) * W + wrap(c, sw, W);
  }

  // The shift region of a padded-shifted position, as timm's get_attn_mask numbers them on the padded
  // size: per dimension, [0, P - w) -> 0, [P - w, P - s) -> 1, [P - s, P) -> 2; an unshifted dimension
  // is one region (timm's slice (-0, None) covers it all).
  EFFVIT_HOST_DEVICE int32_t region(int32_t r, int32_t c) const {
    const int32_t rh = sh ? (r >= Hp - wh) + (r >= Hp - sh) : 0;
    const int32_t rw = sw ? (c >= Wp - ww) + (c >= Wp - sw) : 0;
    return rh * 3 + rw;
  }

  // Row of the relative-position bias table for query token i and key token j of a window.
  EFFVIT_HOST_DEVICE int32_t bias_row(int32_t i, int32_t j) const {
    return (i / ww - j / ww + wh - 1) * (2 * ww - 1) + (i % ww - j % ww + ww - 1);
  }
  // bias_row(i, j) == bias_row_query_part(i) - bias_row_key_part(j): kernels keep one part per token so that
  // the inner loop over (i, j) pairs needs no division.
  EFFVIT_HOST_DEVICE int32_t bias_row_query_part(int32_t i) const {
    return (i / ww + wh - 1) * (2 * ww - 1) + (i % ww + ww - 1);
  }
  EFFVIT_HOST_DEVICE int32_t bias_row_key_part(int32_t j) const { return (j / ww) * (2 * ww - 1) + j % ww; }
};

}  // namespace effvit
