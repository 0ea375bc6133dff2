import pytest

from locallearn.backbones.resnet_cifar import resnet32, resnet110
from locallearn.split import blocks_from_cuts, even_cuts, resolve_cuts

R32, R110 = resnet32(), resnet110()


def table(name, backbone, arch, k):
    return resolve_cuts(len(backbone), k, name, None, arch, backbone.stage_block_to_layer)


# PRIOR_ART §1: "cut after global index" column; our cut = that index + 1 (first layer of the next block)
@pytest.mark.parametrize(
    "arch,k,after",
    [
        ("resnet32", 2, [7]),
        ("resnet32", 3, [5, 10]),
        ("resnet32", 4, [3, 7, 11]),
        ("resnet32", 8, [1, 3, 5, 7, 9, 11, 13]),
        ("resnet32", 16, list(range(15))),
        ("resnet110", 2, [27]),
        ("resnet110", 3, [18, 36]),
        ("resnet110", 4, [12, 26, 40]),
        ("resnet110", 8, [5, 12, 19, 26, 33, 40, 47]),
        ("resnet110", 16, [2, 5, 8, 11, 14, 17, 20, 23, 26, 30, 34, 38, 42, 46, 50]),
        ("resnet110", 55, list(range(54))),
    ],
)
def test_infopro_tables_match_prior_art(arch, k, after):
    backbone = R32 if arch == "resnet32" else R110
    cuts = table("infopro", backbone, arch, k)
    assert cuts == [a + 1 for a in after]
    assert len(blocks_from_cuts(cuts, len(backbone))) == k


def test_infopro_units_per_block():
    sizes = [len(r) for r in blocks_from_cuts(table("infopro", R110, "resnet110", 4), 55)]
    assert sizes == [13, 14, 14, 14]


def test_balanced_tables_match_prior_art():
    assert table("infopro_balanced", R110, "resnet110", 2) == [16]
    assert table("infopro_balanced", R110, "resnet110", 3) == [11, 22]
    assert table("infopro_balanced", R110, "resnet110", 4) == [8, 16, 28]


def test_manpp_tables_add_a_stem_block():
    assert table("manpp", R32, "resnet32", 16) == list(range(1, 16))
    cuts = table("manpp", R110, "resnet110", 33)  # the paper's "K=32"
    assert cuts[0] == 1 and len(cuts) == 32
    assert table("manpp", R110, "resnet110", 55) == list(range(1, 55))


def test_even_split():
    assert even_cuts(16, 16) == list(range(1, 16))
    assert even_cuts(10, 3) == [4, 7]
    assert even_cuts(5, 1) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_blocks=0), "K"),
        (dict(num_blocks=17), "only 16 layers"),
        (dict(num_blocks=3, split="cuts", cuts=[5, 3]), "strictly increasing"),
        (dict(num_blocks=3, split="cuts", cuts=[0, 3]), "1..15"),
        (dict(num_blocks=3, split="cuts", cuts=[3, 16]), "1..15"),
        (dict(num_blocks=3, split="cuts", cuts=[3]), "make 2 blocks"),
        (dict(num_blocks=5, split="infopro"), r"valid K: \[1, 2, 3, 4, 8, 16\]"),
        (dict(num_blocks=2, split="nope"), "unknown split"),
    ],
)
def test_impossible_requests_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_cuts(16, arch="resnet32", to_layer=R32.stage_block_to_layer, **kwargs)


def test_table_for_unknown_arch_names_valid_ones():
    with pytest.raises(ValueError, match="covers"):
        resolve_cuts(10, 2, "infopro", None, "resnet20", None)


def test_manpp_imagenet_resnet34_k2_cuts_after_layer2_0():
    from locallearn.backbones.torchvision_resnet import FACTORIES

    r34 = FACTORIES["resnet34"]()  # layers: stem, layer1 x3, layer2 x4, ...
    assert table("manpp", r34, "resnet34", 2) == [5]  # MAN++ configs.py resnet34 2: [[2, 0], [4, 2]]
