// ShiftViT's shift: which neighbour each output channel reads from.
//
// Shared by the CPU and CUDA kernels so the mapping exists once in C++ (the Triton kernels and the
// reference restate it in Python; the tests tie all of them together).
//
// Channels are split into groups of g = C / n_div: group 0 moves one pixel left, group 1 right,
// group 2 up, group 3 down, channels from 4g on are copied. "Moves left" means out[h, w] = x[h, w + 1]:
// the output reads its right neighbour. The adjoint of the shift (its backward) is the same shift with
// every direction reversed, so one `reverse` flag serves both.
#pragma once

#include <cstdint>

#include "macros.h"

namespace effvit {

struct ShiftOffset {
  int64_t dh;  // source row = h + dh
  int64_t dw;  // source column = w + dw
};

// Offset of the source pixel for output channel `c`; `group` is C / n_div.
EFFVIT_HOST_DEVICE ShiftOffset shift_offset(int64_t c, int64_t group, bool reverse) {
  // 32-bit division: channel counts fit, and 64-bit division is many instructions on a GPU
  const int64_t k = c < 4 * group ? static_cast<int32_t>(c) / static_cast<int32_t>(group) : 4;
  int64_t dh = 0, dw = 0;
  if (k == 0) dw = 1;        // left: read the right neighbour
  else if (k == 1) dw = -1;  // right
  else if (k == 2) dh = 1;   // up: read the neighbour below
  else if (k == 3) dh = -1;  // down
  const int64_t sign = reverse ? -1 : 1;
  return {sign * dh, sign * dw};
}

// Channel range [begin, end) of group k (0..3 the shifted groups, 4 the copied rest).
EFFVIT_HOST_DEVICE void shift_group_range(int64_t k, int64_t group, int64_t channels, int64_t* begin,
                                          int64_t* end) {
  *begin = k * group;
  *end = k < 4 ? (k + 1) * group : channels;
}

}  // namespace effvit
