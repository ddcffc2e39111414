"""Pure-PyTorch code that follows each family's official implementation line by line.

It is the ground truth of every test and the "eager" column of every benchmark, and it is what the
"torch" backend runs. It does no argument checking of its own beyond the official code's: the public
functions in effvit.ops check arguments before any backend runs.
"""

from effvit.reference.shift import (
    ShiftViTBlock,
    shift_feat,
    shift_feat_nhwc,
    shift_group_norm,
)

__all__ = ["ShiftViTBlock", "shift_feat", "shift_feat_nhwc", "shift_group_norm"]
