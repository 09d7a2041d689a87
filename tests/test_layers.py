"""`layers.param`: the three initializers it knows, and a clear error for any other name."""

import re

import numpy as np
import pytest
from flax import nnx

from vrft_jax.models.qwen2_vl import layers
from vrft_jax.models.qwen2_vl.config import Qwen2VLConfig

CONFIG = Qwen2VLConfig.qwen2_vl_2b()


@pytest.mark.parametrize("init", layers.INITIALIZERS)
def test_known_initializers_make_parameters_of_the_shape_and_dtype(init):
    p = layers.param(nnx.Rngs(0), (3, 4), ("embed", "mlp"), CONFIG, init=init)
    value = np.asarray(p[...])
    assert value.shape == (3, 4) and value.dtype == CONFIG.param_dtype
    if init == "ones":
        assert (value == 1).all()
    elif init == "zeros":
        assert (value == 0).all()
    else:
        assert 0 < value.std() < 0.1 and len(np.unique(value)) == value.size


@pytest.mark.parametrize("init", ["zero", "Normal", "xavier", ""])
def test_an_unknown_initializer_name_is_refused_by_name(init):
    # Before, any name other than "normal" or "ones" silently gave zeros.
    known = "known: 'normal', 'ones', 'zeros'"
    with pytest.raises(ValueError, match=re.escape(f"unknown initializer {init!r}") + ".*" + re.escape(known)):
        layers.param(nnx.Rngs(0), (2,), ("norm",), CONFIG, init=init)
