"""The offline tokenizers of the tiny checkpoints, trained on the scene vocabulary (no download).

OPT's: a byte-level BPE (`build_tokenizer`); T5's: a SentencePiece-style Unigram
(`build_t5_tokenizer`). Both learn the words of `scene_corpus()`, which holds every caption and
question the generated scenes produce (`toy.scenes`), so the trained toy models see each word as
one token.
"""
from __future__ import annotations

import itertools
import math
import re
import tempfile
from collections import Counter
from pathlib import Path

from .scenes import SHAPES, scene_sentences

IMAGE_TOKEN = "<image>"

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
POSITIONS = ("left", "right", "above", "below", "top", "bottom", "middle")


def scene_corpus() -> list[str]:
    """Sentences over the scene vocabulary, which both offline tokenizers learn."""
    lines = ["a photo of", "a picture of", "this is", "an image of", "Question: Answer:", "yes", "no"]
    for color, shape in itertools.product(COLORS, SHAPES):
        lines.append(f"a {color} {shape}")
        lines.append(f"two {color} {shape}s")
        lines.append(f"Question: what color is the {shape}? Answer: {color}")
        lines.append(f"Question: is there a {color} {shape}? Answer: yes")
        lines.append(f"a {color} {shape} on a {color} background")
    for n, shape in itertools.product(NUMBERS, SHAPES):
        lines.append(f"Question: how many {shape}s are there? Answer: {n}")
    for pos, shape in itertools.product(POSITIONS, SHAPES):
        lines.append(f"Question: where is the {shape}? Answer: {pos}")
        lines.append(f"the {shape} is on the {pos} of the image, and a dog and a cat")
    # The trained toy models' captions and questions.
    lines.extend(scene_sentences())
    return lines


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE tokenizer in OPT's conventions (bos = eos = </s> = 2, pad = 1).

    Trained offline on `scene_corpus()`; the processor later adds the `<image>` token.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        scene_corpus(), vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        bpe.save(str(path))
        return GPT2TokenizerFast(
            tokenizer_file=str(path),
            bos_token="</s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            add_bos_token=True,
            padding_side="left",
        )


def build_t5_tokenizer():
    """SentencePiece-style Unigram tokenizer in T5's conventions (pad = 0, eos = </s> = 1, unk = 2).

    T5Tokenizer supplies T5's Metaspace pre-tokenizer and decoder and appends </s> to every text.
    The pieces are the corpus's words (punctuation split off) scored by frequency, falling back to
    printable-ASCII characters for unseen words. Not UnigramTrainer: its seeds count each distinct
    word once, so on a corpus of ~70 distinct words it keeps mostly characters ("red" = _ r e d).
    """
    from transformers import T5TokenizerFast

    counts = Counter()
    for line in scene_corpus():
        for word in line.split():
            first, *rest = re.findall(r"\w+|[^\w\s]", word)
            counts.update(["\u2581" + first, *rest])
    total = sum(counts.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, math.log(n / total)) for piece, n in counts.most_common()]
    # Below every word, so a seen word is always one piece.
    fallback = math.log(1 / total) - 1.0
    chars = [chr(c) for c in range(33, 127)]
    vocab += [(piece, fallback) for piece in ["\u2581", *chars, *("\u2581" + c for c in chars if c.isalnum())]
              if piece not in counts]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_bert_tokenizer():
    """WordPiece tokenizer in BERT's conventions ([PAD] = 0, [CLS] text [SEP]), lowercased.

    The Q-Former's own text tokenizer for retrieval checkpoints: Salesforce/blip2-itm-vit-g uses
    bert-base-uncased, whose [CLS] output is the text embedding ITC projects. Its vocabulary is
    written out deterministically (WordPieceTrainer orders ties differently from run to run): the
    special tokens, every word of `scene_corpus()` by frequency, then single characters (with
    their "##" continuations) for unseen words.
    """
    from transformers import BertTokenizerFast

    counts = Counter(w for line in scene_corpus() for w in re.findall(r"\w+|[^\w\s]", line.lower()))
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted(counts, key=lambda w: (-counts[w], w))
    vocab += [c for c in chars if c not in counts] + [f"##{c}" for c in chars if c.isalnum()]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True,
                             model_max_length=512)
