"""Triton model `postprocess`: generated token ids -> the text they add (incremental detokenization)."""
import numpy as np

from blip2_triton import interface as api
from blip2_triton.repository import assets_dir
from blip2_triton.serving import triton_io as io
from blip2_triton.serving.detokenize import Detokenizer


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        self.args = io.ModelArgs(args)
        self.args.require_io([api.GENERATED_IDS.name, api.NEW_TOKENS.name, api.LAST.name],
                             [api.TEXT.name, api.TOKEN_IDS.name, api.FINAL.name])
        self.detokenizer = Detokenizer(AutoTokenizer.from_pretrained(assets_dir(self.args.repository)))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = io.row(request, api.GENERATED_IDS.name).tolist()
                new = io.single(request, api.NEW_TOKENS.name, required=True)
                final = bool(io.single(request, api.LAST.name, required=True))
                text = self.detokenizer.piece(ids, new, final=final)
                responses.append(io.response({
                    api.TEXT.name: np.asarray([text.encode("utf-8")], dtype=object),
                    api.TOKEN_IDS.name: np.asarray(ids[len(ids) - new :], np.int64),
                    api.FINAL.name: np.asarray([final]),
                }))
            except Exception as e:
                responses.append(io.error_response(e))
        return responses
