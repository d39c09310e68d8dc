"""The toy world: tiny BLIP-2 checkpoints built offline and the trained scene models that ship.

    scenes      generated scenes of colored shapes, with captions and VQA pairs (train / held out)
    tokenizer   the offline OPT (BPE) and T5 (Unigram) tokenizers over the scene vocabulary
    presets     tiny BLIP-2 sizes (parity, benchmark) and random-weight checkpoints
    embedded    the trained models and sample images bundled in `blip2_triton/assets`
    model       the trained model's sizes and a freshly initialised one
    config      `TrainConfig`: everything that determines a training run
    dataset     pre-rendered scenes, encoded examples, batches
    losses      BLIP-2's language-model loss and the training-only auxiliary heads
    train       the training loop and its command line (`python -m blip2_triton.toy.train`)
    card        the loss-curve plot and the model card a run writes
    evaluation  caption and VQA accuracy of any answerer (transformers, in-process, served)
    precision   that accuracy in every precision the exporter offers

Nothing in serving imports this package; the CLI, the demo, the benchmarks and the tests do.
"""
