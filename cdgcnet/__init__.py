"""CDGCNet model package: dilated ResNet + ASPP, class-wise dynamic graph convolution, losses,
metrics and inference. Imports torch and numpy only; import submodules directly, e.g.
`from cdgcnet.model import build_model`, `from cdgcnet.config import model_preset`."""
