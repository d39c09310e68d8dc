"""The reference: the same requests through transformers' `generate()` (PyTorch eager, same weights).

Runs inside a benchmark worker process (blip2_triton.benchmarks.worker), so its peak RSS is its own
and its thread count is set before torch does any work. Each call goes from encoded image bytes to
text, like a request to the server: decode the image, run the processor, generate, detokenize.
"""
from __future__ import annotations

import io
import time

from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """A generate() streamer that only notes when each new token arrives.

    generate() first put()s the prompt's input_ids, then one tensor per generated token.
    """

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersRunner:
    kind = "transformers"

    def __init__(self, checkpoint: str, threads: int):
        import torch
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.info = {
            "attn_implementation": self.model.config._attn_implementation,
            "dtype": "float32",
            "torch_threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def _inputs(self, images: list[bytes], prompts: list[str]):
        """Processor inputs; a caption's prompt is "" (not None): the processor then encodes the
        image tokens and the tokenizer's special tokens, without which transformers cannot caption
        with a T5 language model (its config has no bos_token_id to start input_ids from)."""
        from PIL import Image

        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        return self.processor(images=pictures, text=prompts, return_tensors="pt", padding=True)

    def _first_new(self, inputs) -> int:
        """Where generate()'s output starts its new ids: after the prompt for a decoder-only LM, after
        the decoder start token for an encoder-decoder one (whose prompt went to the encoder)."""
        return 1 if self.model.config.text_config.is_encoder_decoder else inputs["input_ids"].shape[1]

    def generate(self, image: bytes, prompt: str, controls: dict) -> dict:
        """One request, bytes to text; seconds, time to first token, token ids, text."""
        clock = TokenClock()
        start = time.perf_counter()
        inputs = self._inputs([image], [prompt])
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, streamer=clock, **controls)
        tokens = out[0, self._first_new(inputs):].tolist()
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        end = time.perf_counter()
        return {
            "seconds": end - start,
            "ttft": clock.times[0] - start if clock.times else None,
            "inter_token": [b - a for a, b in zip(clock.times, clock.times[1:])],
            "tokens": tokens,
            "text": text,
        }

    def batch(self, images: list[bytes], prompt: str, controls: dict) -> dict:
        """Static batching, the throughput transformers offers: one generate() over all images."""
        start = time.perf_counter()
        inputs = self._inputs(images, [prompt] * len(images))
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, **controls)
        new = out[:, self._first_new(inputs):]
        self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return {"seconds": time.perf_counter() - start, "tokens": int(new.numel()), "batch": len(images)}
