import pytest

from iuq.core.config import IUQConfig


def test_paper_defaults():
    c = IUQConfig()
    assert (c.memory_capacity, c.samples_per_instance, c.sampling) == (100_000, 50, "instance_balanced")
    assert (c.inter_loss, c.focal_alpha, c.focal_gamma, c.inter_weight) == ("focal", 0.1, 2.5, 1.0)
    assert (c.equi_weight, c.equi_variant, c.crop_min, c.crop_max) == (3.0, "full", 0.6, 1.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("inter_loss", "hinge"),
        ("memory_capacity", 0),
        ("memory_capacity", 1.5),
        ("sampling", "grid"),
        ("equi_variant", "x"),
        ("focal_alpha", 1.5),
        ("crop_min", 0.0),
        ("equi_weight", -1.0),
        ("inter_mode", "q"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"iuq.{field}"):
        IUQConfig(**{field: value})


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="memory_capcity"):
        IUQConfig.from_dict({"memory_capcity": 10})
    assert IUQConfig.from_dict({"equi": False}).equi is False
