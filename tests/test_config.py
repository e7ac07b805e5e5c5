"""Config: presets, validation errors that name the field, config.json round trips."""

import json
import os

import pytest

from v4jax.config import ConfigError, V4Config, preset
from v4jax.runtime import Runtime

# copies of ../shared/spec/configs (the released Flash / Pro configs)
SPEC = os.path.join(os.path.dirname(__file__), "data", "configs")


@pytest.mark.parametrize("name", ["tiny", "small", "flash", "pro"])
def test_presets_round_trip_through_hf_json(name, tmp_path):
    cfg = preset(name)
    cfg.to_json(tmp_path / "config.json")
    back = V4Config.from_json(tmp_path / "config.json", name=name)
    assert back == cfg


@pytest.mark.parametrize("which", ["flash", "pro"])
@pytest.mark.parametrize("style", ["hf", "inference"])
def test_released_configs_equal_presets(which, style):
    cfg = V4Config.from_json(os.path.join(SPEC, f"v4_{which}_{style}_config.json"), name=which)
    assert cfg == preset(which)


def test_flash_and_pro_schedules():
    f, p = preset("flash"), preset("pro")
    assert f.layer_types[:2] == ("window", "window") and f.layer_types.count("csa") == 21
    assert f.layer_types.count("hca") == 20 and f.compress_ratios[-1] == 0 and len(f.compress_ratios) == 44
    assert p.layer_types[:2] == ("hca", "hca") and p.layer_types.count("csa") == 30
    assert p.layer_types.count("hca") == 31 and "window" not in p.layer_types and len(p.compress_ratios) == 62
    assert f.rope("window").uses_yarn is False and f.rope("csa").uses_yarn and f.rope("hca").theta == 160000


@pytest.mark.parametrize("kw, field", [
    (dict(o_groups=3), "o_groups"),
    (dict(index_topk=0), "index_topk"),
    (dict(layer_types=("window", "csa", "xyz", "csa", "hca", "csa")), "layer_types"),
    (dict(layer_types=("window", "csa")), "layer_types"),
    (dict(n_activated_experts=17), "n_activated_experts"),
    (dict(rope_head_dim=7), "rope_head_dim"),
    (dict(dtype="float16"), "dtype"),
    (dict(n_hash_layers=9), "n_hash_layers"),
    (dict(csa_ratio=8), "csa_ratio"),
    (dict(dim=0), "dim"),
])
def test_invalid_config_names_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny", **kw)


def test_unknown_override_and_preset():
    with pytest.raises(ConfigError, match="no_such_field"):
        preset("tiny").replace(no_such_field=1)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_from_dict_rejects_unknown_hf_layer_type():
    d = preset("tiny").to_hf_dict()
    d["layer_types"][1] = "linear_attention"
    with pytest.raises(ConfigError, match="linear_attention"):
        V4Config.from_dict(d)


def test_to_hf_dict_is_json_and_has_yarn():
    d = preset("tiny").to_hf_dict()
    json.dumps(d)
    assert d["rope_scaling"]["type"] == "yarn" and d["compress_rates"]["heavily_compressed_attention"] == 32


@pytest.mark.parametrize("kw, words", [
    (dict(index_select="sort"), "index_select"),
    (dict(index_select="threshold", attention="reference"), "xla"),
    (dict(index_select="threshold", attention="pallas"), "xla"),
])
def test_runtime_rejects_index_select_it_cannot_honour(kw, words):
    with pytest.raises(ValueError, match=words):
        Runtime(**kw)
    assert Runtime(index_select="threshold").attention == "xla"
