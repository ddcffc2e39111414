// GroupNorm(1, C) arithmetic per sample, shared by the CPU and CUDA kernels.
//
// Statistics come from double-precision sums of x and x^2 over the sample (C*H*W values), which keeps
// fp32 results within 1e-6 of a float64 reference for activations whose mean is not 1e5 times their
// spread. The backward is written as dx = p[c] * dy + q + r * x (plus the shortcut's gradient), with
//   p[c] = rstd * gamma[c]
//   r    = -rstd^2 * S2 / N,   q = -rstd * S1 / N - r * mean
//   S1   = sum_c gamma[c] * G[c],   S2 = sum_c gamma[c] * rstd * (A[c] - mean * G[c])
// where G[c] = sum_hw dy and A[c] = sum_hw dy * x over the sample. That is the usual
// rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with dxhat = gamma * dy, regrouped so one
// pass over (dy, x) gives A and G and a second pass writes dx.
#pragma once

#include <cmath>

#include "shift_geometry.h"  // EFFVIT_HOST_DEVICE

namespace effvit {

struct SampleMoments {
  double mean;
  double rstd;
};

EFFVIT_HOST_DEVICE SampleMoments moments_from_sums(double sum, double sum_sq, double count, double eps) {
  const double mean = sum / count;
  double var = sum_sq / count - mean * mean;  // biased, as GroupNorm
  var = var < 0.0 ? 0.0 : var;  // rounding below 0 clamps; NaN (an inf in the sample) stays, as torch
  return {mean, 1.0 / ::sqrt(var + eps)};
}

// Per-sample coefficients q and r of the backward above (p[c] is rstd * gamma[c]).
struct GroupNormBackwardCoeffs {
  double q;
  double r;
};

EFFVIT_HOST_DEVICE GroupNormBackwardCoeffs group_norm_backward_coeffs(double s1, double s2, double mean,
                                                                     double rstd, double count) {
  const double r = -rstd * rstd * s2 / count;
  const double q = -rstd * s1 / count - r * mean;
  return {q, r};
}

}  // namespace effvit
