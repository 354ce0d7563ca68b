"""A two-minute tour of convert_norms: swap a torchvision DeepLabV3's BatchNorm for GN+WS, show what changed,
and train it for a few steps at 2 images per batch on random data (no downloads)."""

import logging

import torch
import torchvision

from gnlightning import convert_norms, describe_norms


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                         num_classes=3)
    model = convert_norms(model, "gn_ws")
    table = describe_norms(model)
    print("\n".join(str(table).splitlines()[:8] + ["..."] + str(table).splitlines()[-1:]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(2, 3, 96, 96)
    masks = (images[:, 0] > 0).long() + (images[:, 1] > 1).long()
    for step in range(5):
        loss = torch.nn.functional.cross_entropy(model(images)["out"], masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
