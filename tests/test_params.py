"""Parameter counts from shapes only reproduce spec section 1.3."""

import pytest

from v4jax.config import preset
from v4jax.params import count_params


@pytest.mark.parametrize("name, total, with_mtp, active, active_emb, routed_per_layer", [
    ("flash", 284.33e9, 290.94e9, 13.27e9, 13.80e9, 6.44e9),
    ("pro", 1573.0e9, 1598.8e9, 48.85e9, None, 25.37e9),
])
def test_real_model_counts(name, total, with_mtp, active, active_emb, routed_per_layer):
    cfg = preset(name)
    c = count_params(cfg)
    assert abs(c.total - total) < 0.006e9 * (1 if name == "flash" else 100)
    assert abs(c.total_with_mtp - with_mtp) < 0.006e9 * (1 if name == "flash" else 100)
    assert abs(c.active - active) < 0.006e9
    if active_emb:
        assert abs(c.active_with_embedding - active_emb) < 0.006e9
    assert abs(c.routed_experts / cfg.n_layers - routed_per_layer) < 0.006e9


def test_small_and_tiny_sizes():
    assert 80e6 < count_params(preset("small")).total_with_mtp < 130e6
    c = count_params(preset("tiny"))
    assert 23e6 < c.total < 25e6 and 26e6 < c.total_with_mtp < 28e6  # spec 11: 24M / 27M
