"""`TrainConfig`: everything that determines a training run of the toy model."""
from __future__ import annotations

from dataclasses import dataclass

from .embedded import TRAINED_MODEL
from .model import SCENES_PRESET
from .presets import TinyPreset


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the code, it determines the weights).

    The defaults reproduce the bundled checkpoint.

    Why shapes stayed at chance with the LM loss alone (patch 16, init 0.02, 2000 steps; the
    previous default): the LM's loss on shape tokens was ln 3 exactly, images shuffled within a
    batch raised the loss from 0.39 to 2.19 (colors and order were read), and linear / MLP probes
    on the trained vision tokens and query outputs of single-object scenes separated the three
    shapes no better than chance (36-41% held out): the vision tower never learned shapes. The
    same ViT trained directly as a shape classifier on single-object scenes (600 steps, lr 1e-3)
    reached 41% held out at patch 16 / init 0.02, 73% at init 0.1, 70% at init 0.2, and 92% at
    patch 8 / init 0.1: the 0.02 init and 16-pixel patches are what made shapes slow. In the full
    model, 600-step pilots (100 scenes) stayed at chance even with patch 8, init 0.1 and an
    auxiliary loss added to the LM loss from step 0 (slot head, or shape counts, or both); what
    broke the plateau was an auxiliary-only first stage (BLIP-2's two stages in miniature):
    800 + 600 steps: shape 70%, caption 30%; 1500 + 600: shape 69%, caption 36%. Full runs (200
    scenes): 2000 + 2500 steps (1047 s): caption 78.0%, VQA color 63.6%, shape 77.0%, count 95.0%,
    position 72.8%; 2000 + 4500 steps (1467 s, the defaults): caption 96.5%, color 72.3%, shape
    79.1%, count 99.5%, position 90.1%. The questions that pick an object by its color or shape
    lag the captions; with 35% captions instead of 50% (2000 + 2500) the run was stopped unfinished.
    A per-query slot head (`--slot-per-query`, 1000 + 3000 steps) trailed that run's LM loss at
    the same LM step and was stopped.

    Measured before (200 held-out scenes unless noted), none past the shape plateau (loss
    ~0.39-0.41): `--patch-size 8 --lr 2e-3 --warmup-steps 200 --qformer-dropout 0 --shared-images
    --steps 2500` (976 s): caption 10.5%, VQA 50.2%, shape 29.4%; the same with `--patch-size 16
    --steps 4000` (987 s): caption 11.5%, VQA 51.6%, shape 33.2%. 500-step pilots (100 scenes, lr
    2e-3, no dropout): 16 queries, lr 3e-3 and batch 32 (1000 steps) were all worse than 8 queries,
    lr 2e-3, batch 64.

    The bundled checkpoint adds a third stage (`--init-from` the stage-2 checkpoint, LM loss
    only, 35% captions, a new lr cycle peaking at 5e-4; see its model card). Stage 2's checkpoint
    was as weak on its own training scenes (color 79%, shape 80%) as on held-out ones, while its
    captions were right 99% of the time: the objects were encoded, the questions that pick an
    object by an attribute were underfit. Continued training (200 held-out scenes): 800 steps,
    25% captions, lr 3e-4: color 86.1%, shape 82.4%, caption 93.5%; 3000 steps, 35%, 5e-4: color
    and shape 100%, position 92.1%, caption 98.5%; 6000 steps (the bundled one, 637 s at 2
    threads): caption 99.0%, color 100%, shape 99.5%, count 100%, position 96.0%.
    """

    output: str = str(TRAINED_MODEL)
    steps: int = 4500
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_fraction: float = 0.5
    train_scenes: int = 30000
    seed: int = 0
    threads: int = 1
    eval_scenes: int = 200
    # Q-Former hidden and attention dropout (0.1 is transformers' default; the vision tower and
    # the OPT decoder of the preset have none).
    qformer_dropout: float = 0.1
    # Each batch's VQA examples come from the scenes of its captions, so every image is encoded
    # once per step for two examples (half the vision / Q-Former cost per example).
    shared_images: bool = True
    # Weight of the training-only auxiliary loss (`slot_loss`) on the Q-Former outputs; 0: LM loss only.
    aux_weight: float = 1.0
    # First stage: this many steps of the auxiliary losses alone (vision tower, Q-Former and the
    # heads; no language model), before `steps` steps of LM + auxiliary loss. One lr schedule
    # spans both.
    stage1_steps: int = 2000
    slot_aux: bool = True
    shape_count_aux: bool = True
    slot_per_query: bool = False
    # T5 only: the order loss (`losses.order_loss`), each object a position question names -> its
    # rank left to right, read from the encoder's output at its shape word (weight: aux_weight).
    order_aux: bool = False
    # T5 only: the answer loss (`losses.answer_loss`), a position question's answer read from the
    # encoder's output at the prompt's last token (weight: aux_weight).
    answer_aux: bool = False
    # T5 only: the pointer loss (`losses.pointer_loss`), the decoder's first-step cross-attention
    # of its first layer's last two heads pointed at the two objects a position question names
    # (weight: aux_weight).
    pointer_aux: bool = False
    # T5 only: the relative-position bias tables' learning rate is this multiple of `lr`. At 1x
    # they hardly moved from their init (std d_model**-0.5) while the unscaled content logits grew
    # large, so the encoder read its prompt almost as a bag of words (see the T5 model card).
    position_bias_lr_scale: float = 1.0
    # T5 only: the LM loss of position questions' tokens counts this many times (`losses.losses_for`).
    position_lm_weight: float = 1.0
    # initializer_range of the vision tower (the rest keeps the preset's init_std).
    vision_init_std: float = 0.1
    preset: TinyPreset = SCENES_PRESET
    # Continue from this checkpoint (written by this script) instead of a fresh initialisation:
    # the bundled model's stage 3 (see the model card).
    init_from: str | None = None
    # Encoder-decoder LMs: this fraction of the captions is split into an encoder prefix and a
    # decoder suffix, BLIP-2's prefix language modelling for Flan-T5 (see `dataset.prefix_split`).
    prefix_fraction: float = 0.0
    # Start the vision tower, Q-Former and learned queries from this checkpoint's (the rest fresh):
    # the T5 sibling starts from the OPT model's, as BLIP-2's OPT and Flan-T5 models share their
    # first stage.
    image_stages_from: str | None = None
    # Question kind -> sampling weight of that kind among each scene's questions (1 for a kind
    # not named); None: uniform. The Flan-T5 sibling's position stage draws position questions more often.
    qa_weights: dict[str, float] | None = None
