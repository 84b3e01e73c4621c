"""The offline experiments' data pieces: one naming convention, held-out photographs."""

import numpy as np
import pytest

from ir_lora.data import synthetic


def test_group_names_round_trip_with_underscores_in_the_group():
    for group in ("low_light", "haze+noise", "jpeg"):
        name = synthetic.group_name(group, "coffee", 3)
        assert name == f"{group}__coffee_3.png"
        assert synthetic.group_of(name) == group
        assert synthetic.group_of(f"/some/folder/{name}") == group


def test_pair_names_sort_in_index_order():
    names = [synthetic.pair_name(i) for i in range(120)]
    assert sorted(names) == names


def test_random_crops_cycle_through_the_images_in_name_order():
    images = {
        "b": np.full((20, 30, 3), 2, np.uint8),
        "a": np.full((25, 20, 3), 1, np.uint8),
    }
    crops = list(synthetic.random_crops(images, 5, 8, np.random.default_rng(0)))
    assert [i for i, _ in crops] == list(range(5))
    assert [int(c[0, 0, 0]) for _, c in crops] == [1, 2, 1, 2, 1]
    assert all(c.shape == (8, 8, 3) for _, c in crops)


def test_photos_hold_out_the_same_photographs_everywhere():
    train, held_out = synthetic.photos(64)
    assert sorted(held_out) == sorted(synthetic.HELD_OUT)
    assert not set(train) & set(held_out)
    assert all(max(p.shape[:2]) <= 64 for p in [*train.values(), *held_out.values()])
    with pytest.raises(ValueError, match="not sample photographs"):
        synthetic.photos(64, held_out=("kitten",))
