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
    assert (cfg.queries, cfg.impl, cfg.cdgc_precision, cfg.checkpoint) == (
        "all",
        "fast",
        "split",
        False,
    )


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
        ("impl", "sparse", "impl must be one of"),
        ("cdgc_precision", "bf16", "cdgc_precision must be one of"),
        ("queries", "some", "queries must be one of"),
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


@pytest.mark.parametrize("impl", ["fast", "dense", "segmented", "jagged"])
@pytest.mark.parametrize("queries", ["all", "members", "masked"])
def test_every_impl_takes_every_reading_and_checkpointing(impl, queries):
    # "segmented" and "jagged" (earlier fast paths, in stored configs) read as "fast".
    cfg = ModelConfig(impl=impl, queries=queries, checkpoint=True)
    assert (cfg.impl, cfg.queries) == ("dense" if impl == "dense" else "fast", queries)


@pytest.mark.parametrize("precision", ["split", "fp32", "autocast"])
def test_every_cdgc_precision_is_accepted(precision):
    assert ModelConfig(cdgc_precision=precision).cdgc_precision == precision
