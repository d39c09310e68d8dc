"""Triton models `preprocess` and `retrieval_preprocess`: encoded image + prompt -> pixel values +
prompt token ids, with the processor of the checkpoint that config.pbtxt's `checkpoint_dir` names."""
from blip2_triton import api
from blip2_triton import specs
from blip2_triton.repository import CHECKPOINT_DIR, assets_dir
from blip2_triton.serving import triton_io as io
from blip2_triton.errors import InvalidInput
from blip2_triton.serving.preprocess import Preprocessor


class TritonPythonModel:
    def initialize(self, args):
        self.args = io.ModelArgs(args)
        self.args.require_io([api.IMAGE.name, api.PROMPT.name], [specs.PIXEL_VALUES, api.PROMPT_IDS.name])
        checkpoint = self.args.parameter(CHECKPOINT_DIR, str(assets_dir("")))
        self.preprocessor = Preprocessor(self.args.repository / checkpoint)
        self.pixel_dtype = self.args.output_dtype(specs.PIXEL_VALUES)

    def execute(self, requests):
        items, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                items.append((i, io.single(request, api.IMAGE.name, required=True), io.single(request, api.PROMPT.name)))
            except InvalidInput as e:
                responses[i] = io.error_response(e)
        results = self.preprocessor.batch([(image, prompt) for _, image, prompt in items])
        for (i, _, _), result in zip(items, results):
            if isinstance(result, Exception):
                responses[i] = io.error_response(result)
            else:
                pixels, ids = result
                responses[i] = io.response({specs.PIXEL_VALUES: pixels.astype(self.pixel_dtype), api.PROMPT_IDS.name: ids})
        return responses
