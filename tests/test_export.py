"""prepare_for_export: same outputs as the eval model, training machinery gone."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from gnlightning import SyncBatchNorm, WSConv2d, convert_norms
from gnlightning.export import prepare_for_export
from gnlightning.layers import FrozenBatchNorm2d
from tests.helpers import randomized_statistics


@pytest.mark.parametrize("norm", ["bn", "syncbn", "frozen_bn", "gn_ws"])
def test_export_form_equals_eval_model(norm):
    torch.manual_seed(0)
    model = convert_norms(randomized_statistics(torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3)), norm).eval()
    before = copy.deepcopy(model)
    exported = prepare_for_export(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x)["out"], model(x)["out"], rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, (SyncBatchNorm, WSConv2d)) for m in exported.modules())
    if norm in ("bn", "syncbn", "frozen_bn"):  # every conv -> norm pair folded
        kinds = [type(m) for m in exported.modules()]
        assert nn.BatchNorm2d not in kinds and FrozenBatchNorm2d not in kinds
    if norm == "gn_ws":
        assert any(isinstance(m, nn.GroupNorm) for m in exported.modules())
    for key, value in before.state_dict().items():  # the original is untouched
        assert torch.equal(value, model.state_dict()[key])
    torch.jit.trace(exported, x, strict=False)


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_fused_norm_act_layers_are_not_folded_away_with_their_activation(norm):
    # timm's BatchNormAct2d is a BatchNorm2d subclass: folded into the conv before it, its ReLU went with it.
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.BatchNormAct2d(8, act_layer=nn.ReLU))
    randomized_statistics(model)
    model = convert_norms(model, norm).eval()
    exported = prepare_for_export(model)
    assert isinstance(exported[1].act, nn.ReLU)
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    assert (reference == 0).any()  # the activation matters on this input
    torch.testing.assert_close(exported(x), reference)


def test_untraceable_detection_model_keeps_its_norms_and_matches():
    torch.manual_seed(0)
    model = randomized_statistics(torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
        rpn_post_nms_top_n_test=20, box_detections_per_img=5))
    model = convert_norms(model, "gn_ws", include="backbone.fpn").eval()
    exported = prepare_for_export(model)
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected, got = model(images)[0], exported(images)[0]
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, WSConv2d) for m in exported.modules())


# ---- torch.export and ONNX of a converted segmentation model ----

EXPORT_NORMS = ["gn_ws", "syncbn", "bn"]


@pytest.fixture(scope="module")
def segmentation_models():
    """norm -> (eval model, prepare_for_export copy); a small timm backbone keeps every export ~1 s."""
    pytest.importorskip("timm")
    from gnlightning.models import build_model

    models = {}
    for norm in EXPORT_NORMS:
        torch.manual_seed(0)
        model = randomized_statistics(build_model("timm_segmentation", num_classes=4, norm=norm, backbone="resnet10t"))
        model.eval()
        models[norm] = (model, prepare_for_export(model))
    return models


@pytest.mark.parametrize("norm", EXPORT_NORMS)
def test_torch_export_of_converted_segmentation_model(norm, segmentation_models):
    model, prepared = segmentation_models[norm]
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(prepared, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    # WS folded into the weights: no per-call weight statistics left in the graph.
    assert not any("var_mean" in op or "rsqrt" in op for op in ops), ops
    if norm == "gn_ws":
        assert any("group_norm" in op for op in ops), ops
    else:  # (Sync)BN folded into the convolutions
        assert not any("batch_norm" in op for op in ops), ops
    exported = program.module()
    for size in (2, 3):  # the traced batch size and another one (dynamic batch dimension)
        x = torch.randn(size, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(exported(x)["out"], model(x)["out"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["gn_ws", "bn"])  # syncbn's export form is bn's (reverted, then folded)
def test_onnx_export_of_converted_segmentation_model(norm, segmentation_models, tmp_path):
    """The dynamo-based exporter (torch.onnx.export(dynamo=True) needs onnx and onnxscript: the `onnx` extra);
    outputs compared with onnxruntime when it is installed."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    import onnx

    model, prepared = segmentation_models[norm]
    path = tmp_path / f"{norm}.onnx"
    x = torch.randn(2, 3, 64, 64)
    torch.onnx.export(prepared, (x,), str(path), dynamo=True, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(str(path))
    op_types = {node.op_type for node in graph.node}
    assert "Conv" in op_types and "BatchNormalization" not in op_types, op_types
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in (2, 3):
        x = torch.randn(size, 3, 64, 64)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x)["out"], rtol=1e-4, atol=1e-5)
