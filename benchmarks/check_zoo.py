"""Walks torchvision's and timm's zoos: per model, the field at the centre of its last feature map, verify_rf, the
time against one forward + backward pass, or the refusal's first line. No model may take minutes or pass silently
with a wrong layout.

Runs in the bench environment (``make bench-env``, timm 1.0.29 included, from local disk): fresh weights, no
downloads. ``--device cuda`` runs on a GPU; ``--geometry`` also reads each field's (r, S, P) (slow on global fields).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from rf_callback import probe_rf, verify_rf

# torchvision: (constructor, layer, layout, input side)
TORCHVISION = [
    ("resnet18", "layer4", "channels_first", 224),
    ("resnet50", "layer4", "channels_first", 224),
    ("vgg16", "features", "channels_first", 224),
    ("mobilenet_v2", "features", "channels_first", 224),
    ("mobilenet_v3_small", "features", "channels_first", 224),
    ("efficientnet_b0", "features", "channels_first", 224),
    ("regnet_y_400mf", "trunk_output", "channels_first", 224),
    ("densenet121", "features", "channels_first", 224),
    ("inception_v3", "Mixed_7c", "channels_first", 299),
    ("convnext_tiny", "features", "channels_first", 224),
    ("swin_t", "features", "channels_last", 224),
    ("swin_t", "features", "channels_first", 224),  # must be refused: the output is channels last
    ("swin_t", "permute", "channels_first", 224),
    ("swin_v2_t", "features", "channels_last", 256),
    ("vit_b_16", "encoder", "tokens:14x14+1", 224),
    ("maxvit_t", "blocks.3", "channels_first", 224),
    ("shufflenet_v2_x1_0", "conv5", "channels_first", 224),
    ("squeezenet1_1", "features", "channels_first", 224),
    ("mnasnet1_0", "layers", "channels_first", 224),
]
# timm: (model name, layout of forward_features, input side)
TIMM = [
    ("resnet50d", "channels_first", 224),
    ("convnext_tiny", "channels_first", 224),
    ("efficientnet_b0", "channels_first", 224),
    ("mobilenetv3_large_100", "channels_first", 224),
    ("regnety_016", "channels_first", 224),
    ("densenet121", "channels_first", 224),
    ("inception_v3", "channels_first", 299),
    ("maxvit_tiny_tf_224", "channels_first", 224),
    ("vit_small_patch16_224", "tokens:14x14+1", 224),
    ("swin_tiny_patch4_window7_224", "channels_last", 224),
    ("deit_tiny_patch16_224", "tokens:14x14+1", 224),
    ("efficientvit_b0", "channels_first", 224),
    ("repvgg_a0", "channels_first", 224),
    ("ghostnet_100", "channels_first", 224),
    ("cspresnet50", "channels_first", 224),
    ("dla34", "channels_first", 224),
    ("hrnet_w18_small", "channels_first", 224),
    ("coatnet_0_rw_224", "channels_first", 224),
    ("poolformer_s12", "channels_first", 224),
    ("edgenext_xx_small", "channels_first", 256),
    ("mambaout_femto", "channels_last", 224),
    ("sequencer2d_s", "channels_last", 224),
]


class Features(nn.Module):
    """timm's ``forward_features`` as the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def forward_backward_seconds(model: nn.Module, shape, device) -> float:
    x = torch.randn(shape, device=device, requires_grad=True)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def check(name: str, model: nn.Module, layer, layout: str, side: int, device, geometry: bool) -> str:
    model = model.eval().to(device)
    shape = (1, 3, side, side)
    base = forward_backward_seconds(model, shape, device)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            field = probe_rf(model, shape, layer=layer, layout=layout)
            text = field.describe(stride=False)
            if geometry:
                text += f"; geometry {[None if g is None else tuple(g.to_dict().values()) for g in field.geometry]}"
        elapsed = time.perf_counter() - start
        verified = verify_rf(model, field).passed
        warned = f"; warned: {str(caught[0].message)[:120]}" if caught else ""
        return f"{name:<40} {elapsed / base:6.1f}x  verify={verified!s:<5} {text}{warned}"
    except Exception as error:  # noqa: BLE001 - every refusal is reported
        elapsed = time.perf_counter() - start
        first = str(error).split("; ")[0][:200]
        return f"{name:<40} {elapsed / base:6.1f}x  refused ({type(error).__name__}): {first}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--geometry", action="store_true", help="also read the geometry (slow on global fields)")
    parser.add_argument("--only", default="", help="comma-separated substrings of model names to keep")
    args = parser.parse_args()
    device = torch.device(args.device)
    keep = [s for s in args.only.split(",") if s]
    print(f"torch {torch.__version__} on {device}; ratio = probe (+ geometry) / one forward+backward of one sample")
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None:
        for constructor, layer, layout, side in TORCHVISION:
            label = f"torchvision {constructor}.{layer} [{layout}]"
            if keep and not any(k in label for k in keep):
                continue
            kwargs = {"aux_logits": False, "init_weights": True} if constructor == "inception_v3" else {}
            model = getattr(torchvision.models, constructor)(weights=None, **kwargs)
            print(check(label, model, layer, layout, side, device, args.geometry), flush=True)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None:
        for model_name, layout, side in TIMM:
            label = f"timm {model_name} [{layout}]"
            if keep and not any(k in label for k in keep):
                continue
            try:
                model = Features(timm.create_model(model_name, pretrained=False))
            except Exception as error:  # noqa: BLE001 - a model this timm lacks
                print(f"{label:<40} not built: {error}")
                continue
            print(check(label, model, None, layout, side, device, args.geometry), flush=True)


if __name__ == "__main__":
    main()
