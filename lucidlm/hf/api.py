"""``explain(model, inputs)`` for ``transformers`` and torchvision models: one forward, one backward.

Relevance convention (the same as lucidlm's native models, so both paths can be compared):

* text: relevance of token *i* = Σ_d h_id · ∂logit/∂h_id, where h is the hidden state entering the
  first transformer block: after embedding scaling (Gemma's √hidden), after adding learned
  position embeddings (GPT-2); for BERT the output of its embeddings module, whose LayerNorm
  included. Summed in float32 (float64 for a float64 model).
* images: relevance of pixel (y, x) = Σ_c x_cyx · ∂logit/∂x_cyx over the colour channels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ExplainError
from ..explain.explanation import Explanation, ImageExplanation
from ..explain.targets import text_ids, token_strings
from .patch import active, explainable, require_spec
from .registry import ModelSpec
from .vision import display_image, pixel_batch


@dataclass
class Attribution:
    """Raw result of :func:`attribute`, in the model's precision (float32 at least)."""

    relevance: torch.Tensor  # (tokens,) for text, (H, W) for images
    logit: torch.Tensor  # the explained logit, 0-d
    target: int  # token id or class index
    position: int | None  # row of the logits explained (None: one row per input, e.g. classifiers)
    method: str
    input_ids: torch.Tensor | None = None  # (tokens,) for text
    pixels: torch.Tensor | None = None  # (1, C, H, W) for images


# ----------------------------------------------------------------------------- inputs


def _is_tokenizer(obj: Any) -> bool:
    return callable(obj) and hasattr(obj, "decode") and hasattr(obj, "convert_tokens_to_ids")


def _text_inputs(source: Any, text: str | None) -> tuple[dict[str, Any], Any]:
    """(model keyword inputs with a batch of one, tokenizer or None)."""
    tokenizer = None
    if _is_tokenizer(source):
        if text is None:
            raise ExplainError("explain(model, tokenizer, text=...): a tokenizer needs the text to explain")
        tokenizer, source = source, dict(source(text, return_tensors="pt"))
    if isinstance(source, str):
        raise ExplainError("explain(model, text): pass a tokenizer and text=..., or input ids")
    if isinstance(source, Mapping):
        inputs = dict(source)
    elif isinstance(source, torch.Tensor | Sequence):
        inputs = {"input_ids": source}
    else:
        raise ExplainError(f"inputs: expected a tokenizer, a dict of tensors or input ids, got {type(source).__name__}")
    for name, value in list(inputs.items()):
        if isinstance(value, torch.Tensor | list | tuple):
            value = torch.as_tensor(value)
            inputs[name] = value.unsqueeze(0) if value.dim() == 1 else value
    ids = inputs.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
        shape = None if ids is None else tuple(ids.shape)
        raise ExplainError(f"input_ids: expected one sequence, (tokens,) or (1, tokens), got {shape}")
    return inputs, tokenizer


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


# ----------------------------------------------------------------------------- running


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block, then every module's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _rules_for(model: nn.Module, method: str | None, kind: str, options: dict[str, float]):
    """A context that makes ``model`` explainable for the call, or reuses the user's handle."""
    handle = active(model)
    if handle is not None:
        if method is not None and method != handle.method:
            raise ExplainError(f"this model is explainable with method={handle.method!r}; "
                               f"explain(..., method={method!r}) needs that handle removed first")
        return contextlib.nullcontext(handle)
    return explainable(model, method or ("cp-lrp" if kind == "image" else "attnlrp"), **options)


def _first_block(model: nn.Module, spec: ModelSpec) -> nn.Module:
    if spec.blocks is not None:
        blocks = model.get_submodule(spec.blocks)
    else:
        blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)), None)
        if blocks is None:
            raise ExplainError(f"{type(model).__name__}: no nn.ModuleList of blocks found; register "
                               "the model with blocks='path.to.blocks'")
    return blocks[0]


@contextlib.contextmanager
def _block_input(block: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Replace the hidden state entering ``block`` by a leaf that requires grad, and hand it out.

    Cutting the graph there means the backward pass stops at the relevance we read (the
    embeddings need no gradient), and no parameter's ``.grad`` is touched.
    """
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if captured:
            return None
        if args:
            leaf = args[0].detach().requires_grad_(True)
            captured.append(leaf)
            return (leaf, *args[1:]), kwargs
        leaf = kwargs["hidden_states"].detach().requires_grad_(True)
        captured.append(leaf)
        return args, {**kwargs, "hidden_states": leaf}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple | list) else out)


def _precise(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------- targets


def _position(model: nn.Module, ids: torch.Tensor, position: int | None, mask_token_id: int | None) -> int:
    """Logit row to explain: ``position``, else the [MASK] of a masked LM, else the last token."""
    n = ids.shape[-1]
    if position is not None:
        if not -n <= position < n:
            raise ExplainError(f"position={position}: the input has {n} tokens")
        return position % n
    if "MaskedLM" in type(model).__name__:
        if mask_token_id is None:
            raise ExplainError(f"{type(model).__name__}: pass a tokenizer, mask_token_id= or position= "
                               "to say which [MASK] to explain")
        where = (ids[0] == mask_token_id).nonzero()
        if not len(where):
            raise ExplainError(f"no mask token (id {mask_token_id}) in the input")
        return int(where[0])
    return n - 1


def _target_id(target: int | str | None, row: torch.Tensor, model: nn.Module, tokenizer: Any,
               labels: Sequence[str] | None = None) -> int:
    """``target`` as an index into ``row``: None = the top one; str = a label or a single token."""
    size = row.shape[-1]
    if target is None:
        return int(row.argmax())
    if isinstance(target, str):
        found = _label_index(target, model, labels, tokenizer)
        if found is None:
            raise ExplainError(f"target={target!r}: not a label of this model nor a single token "
                               "(pass a tokenizer, labels=, or the id)")
        target = found
    if not 0 <= int(target) < size:
        raise ExplainError(f"target={target}: expected an id in [0, {size})")
    return int(target)


def _label_index(name: str, model: nn.Module, labels: Sequence[str] | None, tokenizer: Any) -> int | None:
    if labels is not None and name in labels:
        return list(labels).index(name)
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    if name in label2id and "Classification" in type(model).__name__:
        return int(label2id[name])
    if tokenizer is not None:  # a single token, as lucidlm's own explain reads a text target
        ids = text_ids(tokenizer, name)
        if len(ids) == 1:
            return int(ids[0])
        vocab = tokenizer.get_vocab()
        if name in vocab:
            return int(vocab[name])
    return None


def _target_name(tid: int, model: nn.Module, tokenizer: Any, classifier: bool,
                 labels: Sequence[str] | None = None) -> str:
    if labels is not None:
        return str(labels[tid])
    if classifier:
        id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
        return str(id2label.get(tid, tid))
    return token_strings(tokenizer, [tid])[0]


# ----------------------------------------------------------------------------- public


def attribute(model: nn.Module, inputs: Any, target: int | str | None = None, method: str | None = None,
              *, text: str | None = None, position: int | None = None, mask_token_id: int | None = None,
              labels: Sequence[str] | None = None, gamma_conv: float = 0.25,
              gamma_linear: float = 0.05) -> Attribution:
    """Relevances at full precision (what :func:`explain` renders). Arguments as for :func:`explain`."""
    spec = require_spec(model)
    options = {"gamma_conv": gamma_conv, "gamma_linear": gamma_linear}
    with _rules_for(model, method, spec.kind, options) as handle, _evaluating(model), torch.enable_grad():
        if spec.kind == "image":
            return _attribute_image(model, inputs, target, handle.method, labels)
        return _attribute_text(model, spec, inputs, target, handle.method, text, position, mask_token_id,
                               labels)


def _attribute_text(model, spec, source, target, method, text, position, mask_token_id, labels):
    inputs, tokenizer = _text_inputs(source, text)
    device = _device(model)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with _block_input(_first_block(model, spec)) as captured:
        logits = _logits(model(**inputs))
    if not captured:
        raise ExplainError(f"{type(model).__name__}: its first block never ran; check blocks= in its registration")
    ids = inputs["input_ids"]
    if mask_token_id is None and tokenizer is not None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
    row_index = None if logits.dim() == 2 else _position(model, ids, position, mask_token_id)
    row = logits[0] if row_index is None else logits[0, row_index]
    tid = _target_id(target, row, model, tokenizer, labels)
    hidden = captured[0]
    (grad,) = torch.autograd.grad(row[tid], hidden)
    relevance = (_precise(hidden) * _precise(grad)).sum(-1)[0]
    return Attribution(relevance.detach(), row[tid].detach(), tid, row_index, method, input_ids=ids[0].detach())


def _attribute_image(model, image, target, method, labels):
    pixels = pixel_batch(image, model)
    row = _logits(model(pixels))[0]
    tid = _target_id(target, row, model, None, labels)
    (grad,) = torch.autograd.grad(row[tid], pixels)
    relevance = (_precise(pixels) * _precise(grad)).sum(1)[0]
    return Attribution(relevance.detach(), row[tid].detach(), tid, None, method, pixels=pixels.detach())


def explain(model: nn.Module, tokenizer_or_inputs: Any, target: int | str | None = None,
            method: str | None = None, text: str | None = None, *, tokenizer: Any = None,
            position: int | None = None, mask_token_id: int | None = None,
            labels: Sequence[str] | None = None, image: torch.Tensor | None = None,
            gamma_conv: float = 0.25, gamma_linear: float = 0.05) -> Explanation | ImageExplanation:
    """Explain one prediction of a ``transformers`` or torchvision model.

    * ``tokenizer_or_inputs``: a tokenizer (with ``text=``), a dict of model inputs (a tokenizer's
      output), or input ids (list or tensor); for an image model, the image tensor
      ((3, H, W) or (1, 3, H, W), as the model takes it).
    * ``target``: ``None`` = the top prediction (next token of a causal LM, the [MASK] token of a
      masked LM, the top class of a classifier); an id; or a string (a single token, or a label
      of ``config.id2label`` / ``labels=``).
    * ``method``: ``"attnlrp"`` (text default) or ``"cp-lrp"`` (image default); images also take
      ``"gamma"`` (CP-LRP + LRP-γ with ``gamma_conv`` / ``gamma_linear``, as LXT does for ViT).
    * ``tokenizer``: names the tokens when the inputs are ids; ``position``: which logit row of
      a language model to explain; ``image``: the picture to draw under the heatmap ((3, H, W)
      in [0, 1]; default the input rescaled).

    Returns an :class:`~lucidlm.explain.explanation.Explanation` (tokens) or an
    :class:`~lucidlm.explain.explanation.ImageExplanation` (pixels), rendered like lucidlm's
    native explanations (terminal, HTML, PNG, JSON).

    The model need not be patched first: it is made explainable for the call and restored
    after, unless it already is (``with lucidlm.hf.explainable(model, method): ...``).
    """
    if _is_tokenizer(tokenizer_or_inputs):
        tokenizer = tokenizer_or_inputs
    result = attribute(model, tokenizer_or_inputs, target, method, text=text, position=position,
                       mask_token_id=mask_token_id, labels=labels, gamma_conv=gamma_conv,
                       gamma_linear=gamma_linear)
    if result.pixels is not None:
        picture = display_image(result.pixels) if image is None else torch.as_tensor(image).float()
        return ImageExplanation(result.relevance.float(), picture,
                                _target_name(result.target, model, None, True, labels),
                                float(result.logit), result.method)
    ids = result.input_ids.tolist()
    tokens = token_strings(tokenizer, ids)
    classifier = result.position is None
    return Explanation(tokens=tokens, token_ids=ids, relevance=result.relevance.float(),
                       target=_target_name(result.target, model, tokenizer, classifier, labels),
                       target_ids=[result.target], target_logit=float(result.logit),
                       method=result.method, prompt=text)
