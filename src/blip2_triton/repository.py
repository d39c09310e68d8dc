"""Layout and generation of the Triton model repository that `blip2-triton export` writes.

    <repo>/blip2/{config.pbtxt,1/model.py,1/llm_*.onnx}  the public model (decoupled): calls
                                         preprocess -> vision_encoder -> qformer (BLS), then
                                         generates with its language model's graphs (llm_decoder,
                                         and llm_encoder for an encoder-decoder) and detokenizes
    <repo>/blip2/1/checkpoint/           checkpoint assets: processor, tokenizer, configs, export report
    <repo>/preprocess/{config.pbtxt,1/model.py}                   dynamic batching
    <repo>/vision_encoder/{config.pbtxt,1/model.py,1/model.onnx}  dynamic batching
    <repo>/qformer/{config.pbtxt,1/model.py,1/model.onnx}         dynamic batching
    <repo>/blip2_ensemble/{config.pbtxt,1/}  the same API as an ensemble: preprocess -> vision_encoder
                                         -> qformer -> blip2 (fed query embeddings and prompt ids)

A retrieval checkpoint (Blip2ForImageTextRetrieval) has models of other names, so that one
repository can hold a generation checkpoint and a retrieval one side by side:

    <repo>/{embed_image,embed_text,match}/{config.pbtxt,1/model.py}  the public calls (BLS over the stages)
    <repo>/match/1/checkpoint/           the retrieval checkpoint's processor, tokenizer, config, export report
    <repo>/retrieval_preprocess/         image bytes -> pixel values (the `preprocess` model.py)
    <repo>/{retrieval_vision_encoder,image_features,text_features,itm}/1/model.onnx   dynamic batching

Every config.pbtxt is generated here from the graph specs (blip2_triton.specs) and the pipeline
interface (blip2_triton.api); export/repository_writer.py writes them, with the model.py
files copied from the `model_repository/` sources.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import api
from . import specs
from .families import graph_specs, is_retrieval
from .pbtxt import ENSEMBLE, EnsembleStep, ModelConfig, ModelTensor
from .sizing import EXCLUSIVE_COMPUTE, MAX_BATCH_SIZE, QUEUE_DELAY_US, Sizing  # noqa: F401 (re-exported)

# The image cache's default bound: ~680 images of a ViT-g/OPT-125m-class checkpoint's queries
# (32 x 768 fp32), ~200 of OPT-2.7b's (32 x 2560 fp32); small next to the decoder's weights.
DEFAULT_IMAGE_CACHE_BYTES = 64 * 2**20

# The image stages are Triton models of their own (batched across requests); every other graph is
# a language-model graph, held by the `blip2` model that owns the KV caches.
STAGE_GRAPHS = (specs.VISION_ENCODER, specs.QFORMER)
# Every retrieval graph is a stateless stage of its own.
RETRIEVAL_GRAPHS = (specs.RETRIEVAL_VISION_ENCODER, specs.IMAGE_FEATURES, specs.TEXT_FEATURES, specs.ITM)
# The models each kind of export writes; an export replaces its own kind's models only.
GENERATION_MODELS = (api.PREPROCESS, *STAGE_GRAPHS, api.PIPELINE, api.ENSEMBLE)
RETRIEVAL_MODELS = (api.RETRIEVAL_PREPROCESS, *RETRIEVAL_GRAPHS, *api.RETRIEVAL_CALLS)
# Model parameter EXCLUSIVE_COMPUTE: "true" makes the model's onnxruntime runs take turns with the
# other models' (serving/compute_lock.py). Right for a CPU server, where every run uses all cores;
# "false" where runs should overlap (a GPU, or a host with cores to spare): see sizing.py.
# Model parameter of a preprocess model and of the retrieval calls: the checkpoint folder (processor,
# tokenizer, configs) relative to the repository.
CHECKPOINT_DIR = "checkpoint_dir"
# Model parameter of a retrieval call's model: which call it serves (one of api.RETRIEVAL_CALLS).
CALL = "call"
# `blip2` parameters: "true" keeps the query embeddings of recent images (serving/image_cache.py),
# so follow-up questions on an image skip the image stages; "false" turns that off. The cache
# holds at most IMAGE_CACHE_BYTES bytes of embeddings, least recently used out first.
IMAGE_CACHE = "image_cache"
IMAGE_CACHE_BYTES = "image_cache_bytes"
# `blip2` parameters bounding its memory (serving/engine.py): the bytes the KV cache of the active
# sequences may reach ("auto": a share of the machine's memory; or a size such as "512MiB"), and
# how many requests may wait for room (more are refused with RESOURCE_EXHAUSTED).
KV_CACHE_BUDGET = "kv_cache_budget"
MAX_QUEUE_SIZE = "max_queue_size"
DEFAULT_KV_CACHE_BUDGET = "auto"
DEFAULT_MAX_QUEUE_SIZE = 64
# Triton's own queue of each dynamically batched model: `blip2` has at most MAX_BATCH_SIZE calls in
# flight to each stage, so this is room for other callers too before Triton refuses ("Exceeds
# maximum queue size").
STAGE_MAX_QUEUE_SIZE = 4 * MAX_BATCH_SIZE


def graph_location(graph: str) -> tuple[str, str]:
    """(model directory, file name) of a graph in the repository."""
    return (graph, "model.onnx") if graph in STAGE_GRAPHS + RETRIEVAL_GRAPHS else (api.PIPELINE, f"{graph}.onnx")


def graph_path(repo: Path | str, graph: str) -> Path:
    model_dir, filename = graph_location(graph)
    return Path(repo) / model_dir / "1" / filename


def assets_dir(repo: Path | str) -> Path:
    """Processor, tokenizer and configs of the exported checkpoint (a folder of the `blip2` model's version)."""
    return Path(repo) / api.PIPELINE / "1" / "checkpoint"


def retrieval_assets_dir(repo: Path | str) -> Path:
    """Processor, tokenizer and config of an exported retrieval checkpoint (in the `match` model's version)."""
    return Path(repo) / api.MATCH / "1" / "checkpoint"


def checkpoint_dir(repo: Path | str, config) -> Path:
    """Where the export of a checkpoint with this Blip2Config keeps its processor, tokenizer and configs."""
    return retrieval_assets_dir(repo) if is_retrieval(config) else assets_dir(repo)


def other_models(config) -> tuple[str, ...]:
    """The models of the other kind of export, which an export into the same repository leaves alone."""
    return GENERATION_MODELS if is_retrieval(config) else RETRIEVAL_MODELS


def model_configs(config, float_dtype: str = "float32", stateless_backend: str = "python",
                  sizing: Sizing | None = None,
                  image_cache_bytes: int | None = DEFAULT_IMAGE_CACHE_BYTES) -> list[ModelConfig]:
    """All model configs of the repository for a Blip2Config, from its family's graphs (blip2_triton.families).

    stateless_backend: "python" serves the vision encoder and Q-Former with onnxruntime inside the
    Python backend (works everywhere); "onnxruntime" uses Triton's onnxruntime backend (NVIDIA's
    containers only). sizing: instances, threads, batching and devices per model (default: one
    instance of each on the CPU, sizing.Sizing()). image_cache_bytes: the bound of `blip2`'s image
    cache; None turns it off.
    """
    if image_cache_bytes is not None and (not isinstance(image_cache_bytes, int) or image_cache_bytes <= 0):
        raise ValueError(f"image_cache_bytes must be a positive int or None (off), got {image_cache_bytes!r}")
    sizing = sizing or Sizing()
    graphs = graph_specs(config, float_dtype)
    if is_retrieval(config):
        return _retrieval_configs(graphs, stateless_backend)
    pixel_values = ModelTensor.from_spec(graphs[specs.VISION_ENCODER].input(specs.PIXEL_VALUES))

    preprocess = ModelConfig(
        name=api.PREPROCESS,
        inputs=(api.IMAGE, api.PROMPT),
        outputs=(pixel_values, api.PROMPT_IDS),
        parameters={CHECKPOINT_DIR: _relative(assets_dir(""))},
        **_sized(sizing, api.PREPROCESS),
    )
    # As the ensemble's generator step, `blip2` takes the Q-Former's output and the prompt ids in
    # place of the image and the prompt: each request sends one pair or the other.
    query_embeds = ModelTensor.from_spec(graphs[specs.QFORMER].output(specs.QUERY_EMBEDS), optional=True)
    generator_inputs = (query_embeds, dataclasses.replace(api.PROMPT_IDS, optional=True))
    pipeline = ModelConfig(
        name=api.PIPELINE,
        max_batch_size=MAX_BATCH_SIZE,
        inputs=(dataclasses.replace(api.IMAGE, optional=True), *api.PUBLIC_INPUTS[1:], *generator_inputs, api.STOP),
        outputs=api.PUBLIC_OUTPUTS,
        decoupled=True,
        # The language model's graphs are found by name (graph_path), its family from the checkpoint's config.
        parameters={
            **sizing.parameters(api.PIPELINE),
            IMAGE_CACHE: "false" if image_cache_bytes is None else "true",
            IMAGE_CACHE_BYTES: str(image_cache_bytes or DEFAULT_IMAGE_CACHE_BYTES),
            KV_CACHE_BUDGET: DEFAULT_KV_CACHE_BUDGET,
            MAX_QUEUE_SIZE: str(DEFAULT_MAX_QUEUE_SIZE),
        },
        **_sized(sizing, api.PIPELINE, batching=False),
    )
    return [preprocess, *(_stateless(graphs[name], stateless_backend, sizing) for name in STAGE_GRAPHS), pipeline,
            ensemble_config()]


def _sized(sizing: Sizing, name: str, batching: bool = True) -> dict:
    """A generation model's instances, devices and batching from `sizing` (ModelConfig fields)."""
    m = sizing.model(name)
    placed = dict(instance_count=m.instances, instance_kind=sizing.kind, gpus=sizing.gpus)
    if not batching:
        return placed
    return dict(placed, max_batch_size=m.max_batch_size, dynamic_batching=True, max_queue_delay_us=m.max_queue_delay_us,
                max_queue_size=STAGE_MAX_QUEUE_SIZE)


def _relative(path: Path) -> str:
    return Path(path).as_posix()


def _stateless(spec: specs.GraphSpec, stateless_backend: str, sizing: Sizing | None = None) -> ModelConfig:
    """A stage serving one ONNX graph, dynamically batched; sized by `sizing` (generation stages),
    else one instance on the CPU taking turns (the retrieval stages)."""
    common = dict(
        name=spec.name,
        inputs=tuple(ModelTensor.from_spec(t) for t in spec.inputs),
        outputs=tuple(ModelTensor.from_spec(t) for t in spec.outputs),
        **(_sized(sizing, spec.name) if sizing else dict(max_batch_size=MAX_BATCH_SIZE, dynamic_batching=True,
                                                          max_queue_delay_us=QUEUE_DELAY_US,
                                                          max_queue_size=STAGE_MAX_QUEUE_SIZE)),
    )
    if stateless_backend == "onnxruntime":
        return ModelConfig(**common, backend=None, platform="onnxruntime_onnx")
    if stateless_backend != "python":
        raise ValueError(f"stateless_backend must be 'python' or 'onnxruntime', got {stateless_backend!r}")
    parameters = sizing.parameters(spec.name) if sizing else {EXCLUSIVE_COMPUTE: "true"}
    return ModelConfig(**common, parameters={"onnx_file": graph_location(spec.name)[1], **parameters})


def _retrieval_configs(graphs: dict[str, specs.GraphSpec], stateless_backend: str) -> list[ModelConfig]:
    """A retrieval checkpoint's models: its preprocess, its four graphs, and the three public calls."""
    pixel_values = ModelTensor.from_spec(graphs[specs.RETRIEVAL_VISION_ENCODER].input(specs.PIXEL_VALUES))
    checkpoint = {CHECKPOINT_DIR: _relative(retrieval_assets_dir(""))}
    preprocess = ModelConfig(
        name=api.RETRIEVAL_PREPROCESS, max_batch_size=MAX_BATCH_SIZE, inputs=(api.IMAGE, api.PROMPT),
        outputs=(pixel_values, api.PROMPT_IDS), dynamic_batching=True, max_queue_delay_us=QUEUE_DELAY_US,
        max_queue_size=STAGE_MAX_QUEUE_SIZE, parameters=checkpoint,
    )
    image_out = ModelTensor.from_spec(graphs[specs.IMAGE_FEATURES].output(specs.IMAGE_EMBEDS_PROJ))
    text_out = ModelTensor.from_spec(graphs[specs.TEXT_FEATURES].output(specs.TEXT_EMBEDS_PROJ))
    calls = {
        api.EMBED_IMAGE: ((api.IMAGE,), (image_out,)),
        api.EMBED_TEXT: ((api.RETRIEVAL_TEXT,), (text_out,)),
        api.MATCH: ((api.IMAGE, api.RETRIEVAL_TEXT), (api.ITM_PROBABILITY, api.ITC_SIMILARITY)),
    }
    public = [
        # Each request runs its stages as BLS calls from its own thread, so the requests of one
        # execute() meet in the stages' dynamic batchers.
        ModelConfig(name=name, max_batch_size=MAX_BATCH_SIZE, inputs=inputs, outputs=outputs, dynamic_batching=True,
                    max_queue_delay_us=QUEUE_DELAY_US, max_queue_size=STAGE_MAX_QUEUE_SIZE,
                    parameters={**checkpoint, CALL: name})
        for name, (inputs, outputs) in calls.items()
    ]
    return [preprocess, *(_stateless(graphs[name], stateless_backend) for name in RETRIEVAL_GRAPHS), *public]


def ensemble_config() -> ModelConfig:
    """`blip2_ensemble`: the `blip2` API as Triton steps. Every tensor keeps its name along the way."""
    same = lambda *names: {n: n for n in names}  # noqa: E731
    controls = (api.STREAM.name, *api.CONTROL_NAMES)
    return ModelConfig(
        name=api.ENSEMBLE,
        max_batch_size=MAX_BATCH_SIZE,
        inputs=api.PUBLIC_INPUTS,
        outputs=api.PUBLIC_OUTPUTS,
        backend=None,
        platform=ENSEMBLE,
        steps=(
            EnsembleStep(api.PREPROCESS, same(api.IMAGE.name, api.PROMPT.name),
                         same(specs.PIXEL_VALUES, api.PROMPT_IDS.name)),
            EnsembleStep(specs.VISION_ENCODER, same(specs.PIXEL_VALUES), same(specs.IMAGE_EMBEDS)),
            EnsembleStep(specs.QFORMER, same(specs.IMAGE_EMBEDS), same(specs.QUERY_EMBEDS)),
            EnsembleStep(api.PIPELINE, same(specs.QUERY_EMBEDS, api.PROMPT_IDS.name, *controls),
                         same(*(t.name for t in api.PUBLIC_OUTPUTS))),
        ),
    )
