"""Networks: this project's U-Net (MONAI's are configured in conf/model/), and the check that
a checkpoint's weights fit a network."""

from torch import Tensor, nn

from prostate_seg.models.unet import UNet

__all__ = ["UNet", "network_weights", "weights_mismatch"]


def weights_mismatch(model: nn.Module, state_dict: dict[str, Tensor]) -> str | None:
    """Why ``state_dict`` cannot be loaded into ``model`` (first differing layer shape, or
    layers missing on either side), in one line; None when it fits."""
    own = model.state_dict()
    for key, tensor in state_dict.items():
        if key in own and own[key].shape != tensor.shape:
            return (f"layer {key} is {list(tensor.shape)} in the checkpoint but "
                    f"{list(own[key].shape)} in the model")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        return f"{len(missing)} layers of the model are not in the checkpoint ({missing[0]}, ...)"
    if unexpected:
        return (f"{len(unexpected)} layers of the checkpoint are not in the model "
                f"({unexpected[0]}, ...)")
    return None


def network_weights(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The network's own weights in a training checkpoint's state_dict (its ``net.`` entries)."""
    return {k[len("net."):]: v for k, v in state_dict.items() if k.startswith("net.")}
