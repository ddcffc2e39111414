"""pytest plugin (``-p _timm_patch_shim``) with which tests/test_timm_model_tests.py runs timm's own
tests/test_models.py over patched models: every model timm.create_model makes goes through effvit.patch.timm right
after it is made (ViTs at keep_rate=1.0, which must be timm's numbers exactly).

Loaded as a plugin it is imported before test_models.py, whose ``from timm import create_model`` then binds this
create_model. effvit.patch.timm raises when it finds nothing to patch, so each model a test makes is patched.
"""

from __future__ import annotations

import timm
import timm.models

import effvit

_create_model = timm.create_model


def create_model(*args, **kwargs):
    return effvit.patch.timm(_create_model(*args, **kwargs), keep_rate=1.0)


timm.create_model = timm.models.create_model = create_model
