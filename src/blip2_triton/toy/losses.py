"""The training losses: BLIP-2's language-model loss and the training-only auxiliary heads.

The auxiliary heads read the Q-Former's query outputs or the vision tower's tokens; they are not
part of the checkpoint, only their gradient into the image stages is kept (see TrainConfig).
"""
from __future__ import annotations

from .presets import TinyPreset
from .scenes import MAX_OBJECTS, OBJECT_COLORS, SHAPES


def aux_heads(preset: TinyPreset, slot: bool, shape_count: bool, slot_per_query: bool = False,
              order: bool = False, answer: bool = False):
    """The training-only auxiliary heads (a ModuleDict; None when every one is off)."""
    import torch

    heads = {}
    if (order or answer) and preset.family != "t5":
        raise ValueError("the order and answer losses read the T5 encoder's outputs: they need family t5")
    if order:
        heads["order"] = torch.nn.Linear(preset.text_hidden, MAX_OBJECTS)
    if answer:
        heads["answer"] = torch.nn.Linear(preset.text_hidden, 2)
    if slot and slot_per_query:
        heads["slot_query"] = torch.nn.Linear(preset.qformer_hidden, len(SHAPES) + 1 + len(OBJECT_COLORS) + 1)
    elif slot:
        heads["slot"] = slot_head(preset.num_query_tokens, preset.qformer_hidden)
    if shape_count:
        heads["shape_count"] = torch.nn.Linear(preset.vision_hidden, len(SHAPES) * (MAX_OBJECTS + 1))
    return torch.nn.ModuleDict(heads) if heads else None


def shape_count_loss(head, image_embeds, slots):
    """Cross-entropy of how many objects of each shape (0..MAX_OBJECTS) the image holds, read by a
    linear `head` from the mean of the vision tower's output tokens image_embeds [B, T, Dv]: a
    direct, translation-invariant shape signal into the vision tower."""
    import torch
    import torch.nn.functional as F

    counts = torch.stack([(slots[..., 0] == k).sum(-1) for k in range(len(SHAPES))], -1)  # [B, S]
    logits = head(image_embeds.mean(1)).view(-1, len(SHAPES), MAX_OBJECTS + 1)
    return F.cross_entropy(logits.reshape(-1, MAX_OBJECTS + 1), counts.reshape(-1))


def slot_head(num_query_tokens: int, qformer_hidden: int):
    """Training-only auxiliary head: the Q-Former's query outputs -> each object's shape and color.

    BLIP-2 trains its Q-Former in a first stage with losses on the query outputs themselves
    (image-text contrastive and matching) before the LM loss; here one linear layer reads the
    flattened query outputs [B, Q * H] and classifies, for each of the MAX_OBJECTS slots left to
    right, the shape (or "none") and the color (or "none"). It is not part of the checkpoint:
    only its gradient into the Q-Former and the vision tower is kept. See TrainConfig.aux_weight.
    """
    import torch

    n_out = MAX_OBJECTS * (len(SHAPES) + 1 + len(OBJECT_COLORS) + 1)
    return torch.nn.Linear(num_query_tokens * qformer_hidden, n_out)


def slot_loss(head, query_output, slots, per_query: bool = False):
    """Mean cross-entropy of `head` over the slots' shapes and colors; query_output [B, Q, H].

    per_query: `head` reads query k alone for slot k (the first MAX_OBJECTS queries then hold
    the objects left to right); otherwise it reads all queries flattened.
    """
    import torch.nn.functional as F

    n_shape, n_color = len(SHAPES) + 1, len(OBJECT_COLORS) + 1
    if per_query:
        logits = head(query_output[:, :MAX_OBJECTS])
    else:
        logits = head(query_output.flatten(1)).view(-1, MAX_OBJECTS, n_shape + n_color)
    return (F.cross_entropy(logits[..., :n_shape].reshape(-1, n_shape), slots[..., 0].reshape(-1))
            + F.cross_entropy(logits[..., n_shape:].reshape(-1, n_color), slots[..., 1].reshape(-1))) / 2


def order_loss(head, encoder_states, order):
    """Cross-entropy of each object a position question names being k-th from the left, read by a
    linear `head` from the T5 encoder's output at the object's shape word; order [N, 3] holds
    (example, token position, rank). T5 has no absolute positions and its attention values carry
    none, so the rank the question needs must travel as content from the query embeddings to the
    question's words: this loss asks the encoder for that directly."""
    import torch.nn.functional as F

    return F.cross_entropy(head(encoder_states[order[:, 0], order[:, 1]]), order[:, 2])


def answer_loss(head, encoder_states, attention_mask, answer):
    """Cross-entropy of a position question's answer (0 left, 1 right), read by a linear `head` from
    the T5 encoder's output at the prompt's last token (its </s>); answer [N, 2] holds (example,
    answer). The decoder's first step has only its start token, the same for every question, so
    its cross-attention can pick encoder tokens by content alone: the answer must be computed in
    the encoder and sit at a token every prompt has, which this loss asks for directly."""
    import torch.nn.functional as F

    last = attention_mask.sum(1) - 1
    rows = answer[:, 0]
    return F.cross_entropy(head(encoder_states[rows, last[rows]]), answer[:, 1])


def first_step_cross_attention(model, inputs_embeds, attention_mask, labels):
    """T5's LM output for a batch, and the log-weights [B, heads, source] of the first decoder
    layer's cross-attention at the first decoding step, computed from that layer's own inputs
    (its logits, not the softmax's output: a saturated softmax rounds weights to 0, whose log
    has no gradient)."""
    import torch

    cross = model.language_model.decoder.block[0].layer[1]
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["source"] = kwargs.get("key_value_states", args[1] if len(args) > 1 else None)

    handle = cross.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        lm = model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
    finally:
        handle.remove()
    attn = cross.EncDecAttention
    n, d = attn.n_heads, attn.key_value_proj_dim
    q = attn.q(cross.layer_norm(seen["hidden"][:, :1])).view(-1, n, d)  # [B, heads, d]
    k = attn.k(seen["source"]).view(q.size(0), -1, n, d)  # [B, source, heads, d]
    scores = torch.einsum("bhd,bshd->bhs", q, k)  # T5 does not scale its attention scores
    scores = scores.masked_fill(attention_mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
    return lm, scores.log_softmax(-1)


def pointer_loss(log_attention, order, heads: tuple[int, int]):
    """Mean negative log of the decoder's first-step cross-attention on the two objects a position
    question names: head `heads[0]` of its first layer on the first-named object's shape word,
    `heads[1]` on the second's; log_attention [B, heads, source] (`first_step_cross_attention`),
    order [N, 3] as in `order_loss` (two rows per question, in prompt order). That first step's
    query is the decoder start token, the same for every prompt, so it finds encoder tokens by
    their content alone and the LM loss never made it tell the two named objects apart (it split
    one head evenly between both); this loss points one head at each, and the LM loss then learns
    the comparison from what they read."""
    import torch

    rows, pos = order[:, 0], order[:, 1]
    named_first = torch.ones(len(order), dtype=torch.bool)
    named_first[1:] = rows[1:] != rows[:-1]
    head = torch.where(named_first, heads[0], heads[1])
    return -log_attention[rows, head, pos].mean()


def losses_for(model, batch, heads=None, position_lm_weight: float = 1.0, pointer_heads=None):
    """(LM loss, auxiliary loss) for a batch; each image row is encoded once.

    The LM loss is None for an image-only batch (`SceneDataset.image_batch`); the auxiliary loss
    (the sum of the `heads`' losses, see `aux_heads`) is None without heads.

    T5: `pointer_heads` (two head indices) adds `pointer_loss` to the auxiliary loss.

    T5: `position_lm_weight` scales the LM loss of the position questions' tokens (the batch's
    `answer` rows); the loss stays the sum over target tokens divided by their count.

    The LM loss is BLIP-2's (OPT or T5), `model(**batch).loss` when every example has its own image row: the
    query outputs of every row of `pixel_values` (`Blip2ForConditionalGeneration.
    get_image_features`) are gathered per example with `image_index` (when given) and scattered
    into the `<image>` positions exactly as the model's own forward does.
    """
    features = model.get_image_features(batch["pixel_values"], return_dict=True)
    aux = None
    if heads is not None:
        parts = []
        if "slot" in heads:
            parts.append(slot_loss(heads["slot"], features.qformer_outputs.last_hidden_state, batch["slots"]))
        if "slot_query" in heads:
            parts.append(slot_loss(heads["slot_query"], features.qformer_outputs.last_hidden_state, batch["slots"],
                                   per_query=True))
        if "shape_count" in heads:
            parts.append(shape_count_loss(heads["shape_count"], features.last_hidden_state, batch["slots"]))
        aux = sum(parts) if parts else None
    if "input_ids" not in batch:  # an image-only batch (`SceneDataset.image_batch`)
        return None, aux
    image_features = features.pooler_output
    if "image_index" in batch:
        image_features = image_features[batch["image_index"]]
    input_ids = batch["input_ids"]
    inputs_embeds = model.get_input_embeddings()(input_ids)
    mask = model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds)
    inputs_embeds = inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))
    labels = batch["labels"]
    if not model.config.use_decoder_only_language_model:
        # T5 makes its decoder's inputs from the labels and returns their loss, as in the model's forward.
        pointer = pointer_heads is not None and len(batch["order"]) > 0
        if pointer:
            lm, log_attention = first_step_cross_attention(model, inputs_embeds, batch["attention_mask"], labels)
        else:
            lm = model.language_model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"],
                                      labels=labels)
        loss = lm.loss
        if position_lm_weight != 1.0 and len(batch["answer"]):
            import torch
            import torch.nn.functional as F

            tokens = F.cross_entropy(lm.logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            weight = torch.ones(labels.size(0), dtype=tokens.dtype)
            weight[batch["answer"][:, 0]] = position_lm_weight
            loss = (tokens * weight[:, None]).sum() / (labels != -100).sum()
        if heads is not None and "order" in heads and len(batch["order"]):
            order = order_loss(heads["order"], lm.encoder_last_hidden_state, batch["order"])
            aux = order if aux is None else aux + order
        if heads is not None and "answer" in heads and len(batch["answer"]):
            answer = answer_loss(heads["answer"], lm.encoder_last_hidden_state, batch["attention_mask"],
                                 batch["answer"])
            aux = answer if aux is None else aux + answer
        if pointer:
            point = pointer_loss(log_attention, batch["order"], pointer_heads)
            aux = point if aux is None else aux + point
        return loss, aux
    logits = model.language_model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"]).logits
    lm = model.loss_function(logits=logits[:, -labels.size(1):, :], labels=labels,
                             vocab_size=model.config.text_config.vocab_size)
    return lm, aux


def lm_loss(model, batch):
    """BLIP-2's LM loss for a batch (see `losses_for`)."""
    return losses_for(model, batch)[0]
