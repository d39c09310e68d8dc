"""Loading a checkpoint for export, and the checks that refuse one the repository could not serve."""
from __future__ import annotations


class ProcessorMismatchError(ValueError):
    """The checkpoint's image processor does not produce the images its vision encoder takes."""


def load_checkpoint(model: str, float_dtype: str = "float32"):
    """Model (eager attention, for tracing) and processor via transformers' own from_pretrained:
    a Blip2ForImageTextRetrieval when config.json names that architecture, else a
    Blip2ForConditionalGeneration."""
    import torch
    from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    from blip2_triton.families import is_retrieval

    processor = AutoProcessor.from_pretrained(model)
    cls = Blip2ForImageTextRetrieval if is_retrieval(AutoConfig.from_pretrained(model)) else Blip2ForConditionalGeneration
    blip2 = cls.from_pretrained(
        model, dtype=getattr(torch, float_dtype), attn_implementation="eager"
    ).eval()
    return blip2, processor


def processor_image_size(image_processor) -> tuple[int, int] | None:
    """(height, width) of every image the processor outputs, or None when it does not fix one
    (no resize, or a shortest-edge resize without a crop)."""
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop and crop.get("height") and crop.get("width"):
        return int(crop["height"]), int(crop["width"])
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_resize", False) and size and size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    return None


def check_image_size(processor, config) -> None:
    """Refuse a processor whose images are not vision_config.image_size square: the vision encoder
    graph (and its position embeddings) takes exactly that size, so serving would fail on every request."""
    expected = config.vision_config.image_size
    produced = processor_image_size(processor.image_processor)
    if produced != (expected, expected):
        what = "images of no fixed size" if produced is None else f"{produced[0]}x{produced[1]} images"
        raise ProcessorMismatchError(
            f"the checkpoint's image processor (processor_config.json / preprocessor_config.json: size, crop_size) "
            f"produces {what}, but its vision encoder takes {expected}x{expected} (config.json: "
            f"vision_config.image_size); fix one of them before exporting"
        )
