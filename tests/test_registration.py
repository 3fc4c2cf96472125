"""Our names are registered in BasicSR's registries and do not clash with BasicSR's own."""

import pytest
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

import glare_nat_models  # noqa: F401  (registers archs, data, models, losses, metrics)

OURS = {
    ARCH_REGISTRY: ["GLAREVQGAN", "GLAREFlowNet", "GLARENet", "PatchGANDiscriminator", "LatentNAT", "DecoderNAT"]
    + ["GLARENATFlowNet", "GLARENATNet"],
    DATASET_REGISTRY: ["LOLPairedDataset", "LOLUnpairedDataset"],
    METRIC_REGISTRY: ["calculate_psnr_gtmean", "calculate_ssim_gtmean", "calculate_lpips", "calculate_lpips_gtmean"],
    LOSS_REGISTRY: ["MSSSIMLoss", "VGG16PerceptualLoss", "LPIPSLoss", "HingeGANLoss"],
    MODEL_REGISTRY: [
        "GLAREBaseModel",
        "VQGANModel",
        "GLAREFlowModel",
        "GLAREAFTModel",
        "GLARENATModel",
        "GLARENATAFTModel",
    ],
}


@pytest.mark.parametrize("registry", list(OURS), ids=lambda r: r._name)
def test_our_names_registered(registry):
    for name in OURS[registry]:
        obj = registry.get(name)
        assert obj.__module__.startswith("glare_nat_"), f"{name} resolves to {obj.__module__}"


def test_stock_names_still_resolve_to_basicsr():
    assert ARCH_REGISTRY.get("RRDBNet").__module__.startswith("basicsr.")
    assert MODEL_REGISTRY.get("SRModel").__module__.startswith("basicsr.")
    assert METRIC_REGISTRY.get("calculate_psnr").__module__.startswith("basicsr.")
