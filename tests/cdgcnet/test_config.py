import pytest

from cdgcnet.config import ModelConfig, model_preset


def test_defaults_are_the_paper_model():
    cfg = ModelConfig()
    assert (cfg.depth, cfg.output_stride, cfg.aspp, cfg.context, cfg.graph) == (
        101,
        8,
        True,
        "cdgc",
        "ds",
    )
    assert (cfg.channels, cfg.fusion, cfg.ratio, cfg.num_classes) == (512, "concat", 1.0, 19)


@pytest.mark.parametrize(
    ("name", "classes", "depth", "channels"),
    [
        ("cityscapes", 19, 101, 512),
        ("voc", 21, 101, 512),
        ("cocostuff", 171, 101, 512),
        ("cpu_small", 19, 18, 64),
    ],
)
def test_presets(name, classes, depth, channels):
    cfg = model_preset(name)
    assert (cfg.num_classes, cfg.depth, cfg.channels, cfg.output_stride) == (
        classes,
        depth,
        channels,
        8,
    )


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'kitti'"):
        model_preset("kitti")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("depth", 152, "depth must be one of"),
        ("output_stride", 32, "output_stride must be one of"),
        ("context", "nonlocal", "context must be one of"),
        ("graph", "knn", "graph must be one of"),
        ("fusion", "mul", "fusion must be one of"),
        ("impl", "fast", "impl must be one of"),
        ("ratio", 1.5, r"ratio must be a number in \[0, 1\]"),
        ("ratio", "high", "ratio must be a number"),
        ("parts", ("easy", "medium"), "parts must be distinct names"),
        ("parts", ("easy", "easy"), "parts must be distinct names"),
        ("parts", (), "parts must be a non-empty tuple"),
        ("channels", 0, "channels must be an int >= 1"),
        ("num_classes", 0, "num_classes must be an int >= 1"),
        ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
        ("aux", "yes", "aux must be a bool"),
        ("pretrained", 3, "pretrained must be a path or None"),
    ],
)
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=f"ModelConfig.{message}"):
        ModelConfig(**{field: value})


def test_lists_from_yaml_become_tuples_and_replace_validates():
    cfg = ModelConfig(parts=["hard_pos", "easy"])
    assert cfg.parts == ("hard_pos", "easy")
    assert cfg.replace(fusion="sum").fusion == "sum"
    with pytest.raises(ValueError, match="fusion"):
        cfg.replace(fusion="max")


def test_jagged_with_checkpoint_is_refused():
    assert ModelConfig(impl="jagged", queries="members").impl == "jagged"
    with pytest.raises(ValueError, match=r"ModelConfig.impl='jagged' cannot be checkpointed"):
        ModelConfig(impl="jagged", checkpoint=True, queries="members")
