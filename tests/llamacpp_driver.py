"""Run llama.cpp's ``convert_hf_to_gguf.py`` on several model directories in one process (its
import of torch and transformers is most of a conversion's time):

    python tests/llamacpp_driver.py CONVERTER_DIR MODEL_DIR OUTFILE OUTTYPE [MODEL_DIR OUTFILE OUTTYPE ...]

A conversion that fails leaves ``OUTFILE.error`` (its traceback) and the others go on.

The converter imports ``sentencepiece`` before it looks for a ``tokenizer.model`` file; our models
have none (their tokenizers are ``tokenizer.json``): see :func:`_without_sentencepiece`. Under
transformers 5 it misses config.json keys it reads by name: see :func:`_with_config_json_keys`. Nemotron's
converter reads no ``tokenizer.json``: see :func:`_nemotron_vocab_from_tokenizer_json`.
"""

from __future__ import annotations

import importlib
import json
import importlib.util
import pathlib
import sys
import traceback


def _without_sentencepiece(base) -> None:
    """Where ``sentencepiece`` is not installed, raise the converter's own FileNotFoundError for a
    directory without ``tokenizer.model`` before its import of the package (the next line of
    ``TextModel._create_vocab_sentencepiece`` does the same), so that it falls back to
    ``tokenizer.json`` as it does with the package."""
    if importlib.util.find_spec("sentencepiece") is not None:
        return
    original = base.TextModel._create_vocab_sentencepiece

    def create_vocab(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
        return original(self)

    base.TextModel._create_vocab_sentencepiece = create_vocab


def _nemotron_vocab_from_tokenizer_json(nemotron) -> None:
    """``NemotronModel.set_vocab`` reads only a SentencePiece ``tokenizer.model`` (its published
    checkpoints have one); our test models have a byte-level BPE ``tokenizer.json``: write it as
    ``TextModel._set_vocab_gpt2`` does for every such model, so that the family's own keys and tensors
    (what the test compares) come from the converter unchanged."""
    original = nemotron.NemotronModel.set_vocab

    def set_vocab(self):
        if (self.dir_model / "tokenizer.model").is_file():
            return original(self)
        return self._set_vocab_gpt2()

    nemotron.NemotronModel.set_vocab = set_vocab


def _with_config_json_keys(base) -> None:
    """Give the converter the config.json keys that transformers 5's ``AutoConfig(...).to_dict()`` no
    longer returns (GPT-NeoX's ``rotary_pct`` moved into ``rope_parameters``), as transformers 4 did:
    the converter reads them by name."""
    original = base.ModelBase.load_hparams

    def load_hparams(dir_model, is_mistral_format):
        config = original(dir_model, is_mistral_format)
        path = pathlib.Path(dir_model) / "config.json"
        if not is_mistral_format and path.is_file():
            config = json.loads(path.read_text(encoding="utf-8")) | config
        return config

    base.ModelBase.load_hparams = staticmethod(load_hparams)


def main(argv: list[str]) -> None:
    converter = pathlib.Path(argv[0])
    sys.path.insert(0, str(converter))
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter / "convert_hf_to_gguf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _without_sentencepiece(importlib.import_module("conversion.base"))
    _with_config_json_keys(importlib.import_module("conversion.base"))
    _nemotron_vocab_from_tokenizer_json(importlib.import_module("conversion.nemotron"))
    jobs = argv[1:]
    for model_dir, outfile, outtype in zip(jobs[::3], jobs[1::3], jobs[2::3]):
        sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", outtype]
        try:
            script.main()
        except (Exception, SystemExit):  # noqa: BLE001 - the test reports it for this case alone
            pathlib.Path(outfile + ".error").write_text(traceback.format_exc())


if __name__ == "__main__":
    main(sys.argv[1:])
