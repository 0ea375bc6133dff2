"""``first_images``: the deterministic first-N subset shared by the detection, segmentation and SR sets."""

from dataclasses import dataclass

import pytest

from locallearn.data.loader import first_images


@dataclass
class Lists:
    a: list
    b: list | None
    mean: tuple = (0.5,)


def test_first_images_cuts_every_list_and_keeps_the_rest():
    d = Lists([1, 2, 3], ["x", "y", "z"], mean=(0.1,))
    assert first_images(d, 2, ("a", "b")) == Lists([1, 2], ["x", "y"], mean=(0.1,))
    assert first_images(Lists([1, 2, 3], None), 1, ("a", "b")) == Lists([1], None)
    assert first_images(d, None, ("a", "b")) is d and first_images(d, 3, ("a", "b")) is d
    with pytest.raises(ValueError, match=">= 1"):
        first_images(d, 0, ("a", "b"))
