"""blip2-triton: BLIP-2 checkpoints exported to validated ONNX graphs and served on Triton.

Layers (imports point down only, and tests/test_layers.py holds every module to it):

    entry points   cli, demo, server.serve
    features       export/ (tracing, gate, repository writing), serving/ (what the Triton models
                   run), server/ (starting tritonserver), client/, frontend/ (the OpenAI-compatible
                   HTTP front door, over the client), benchmarks/, toy/ (the trained tiny models),
                   model_repository/ (thin Triton model.py files)
    core           specs, families, api, errors, pbtxt, progress, repository (layout and
                   config generation), generation/ (numpy decoding that reproduces generate())

Glossary (one word per concept; modules are named after them):

    graph           one exported ONNX graph (vision_encoder, qformer, llm_encoder, llm_decoder)
    spec            a graph's declared inputs and outputs (specs.GraphSpec, specs.TensorSpec)
    family          a kind of language model (OPT, T5), keyed by text_config.model_type
                    (families.Family); its builder (export/families.py) and runtime
                    (serving/language_model.py) register under the same name
    language model  a family's runtime over its graphs (serving.language_model.LanguageModel):
                    prefill, step, cache, history, context check
    cache           the buffers of every active sequence, updated in place (serving/kv_cache.py)
    api             the public `blip2` model's tensors, controls and refusal reasons (api.py)
    model tensor    an input or output of a served Triton model (pbtxt.ModelTensor), declared in
                    api.py or derived from a spec
    controls        a request's generate() arguments (api.CONTROLS), validated into
                    generation.GenerationParams
    search          one request's decoding strategy: greedy/sampling or beam search
                    (generation.search.Search, made by make_search)
    request         one client request as the engine takes it (serving.engine.Request)
    sequence        a request admitted into the engine: its rows in the cache, its length
    row             one line of a batched language-model call: a sequence has one, or one per beam
    engine          the continuous-batching loop (serving.engine.Engine): one step advances every
                    sequence by one batched language-model call
    generator       the language model + engine + request validation (serving.generator.Generator)
    stage           a stateless step before the language model: preprocess, vision_encoder, qformer
    service         one BLIP-2 request end to end: stages, generator, detokenizer
                    (serving.service.Blip2Service); LocalPipeline runs it without Triton
    piece           one response of a request: the text and token ids since the previous one
    refusal         a request the server will not run: INVALID_ARGUMENT with a reason (api.Reason)
    retrieval       a Blip2ForImageTextRetrieval checkpoint (families.is_retrieval): its graphs
                    (specs.retrieval_specs) and its calls embed_image, embed_text, match
                    (api.RETRIEVAL_CALLS; serving.retrieval.RetrievalService)
"""
