"""Offline lm-eval tasks and tiny HF checkpoints for the harness tests (test_harness, test_cli_evaluate).

Tasks are YAML files reading local JSONL (``dataset_path: json``): nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
import shutil

MC = [  # multiple choice: the answer is an index into choices
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five", " seven"], "answer": 0},
    {"question": "The sky on a clear day is ", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin", " Fahrenheit"], "answer": 0},
    {"question": "Café owners in Zürich sell", "choices": [" coffee", " cars", " ships"], "answer": 1},
    {"question": "Monday comes after", "choices": [" Sunday", " Friday", " Tuesday"], "answer": 0},
]
GEN = [
    {"question": "Q: What is the capital of France?\nA:", "answer": " Paris"},
    {"question": "Q: What color is the sky?\nA:", "answer": " Blue"},
    {"question": "Count: one, two, three,", "answer": " four"},
    {"question": "Hello, my name is", "answer": " John"},
]
ROLLING = [{"text": "The quick brown fox jumps over the lazy dog. " * 3},
           {"text": "Permission is hereby granted, free of charge, to any person obtaining a copy."}]


def _yaml(name: str, data: pathlib.Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


def write_tasks(directory: pathlib.Path) -> pathlib.Path:
    """Three tasks in ``directory``: lucid_mc (multiple_choice), lucid_gen (generate_until) and
    lucid_roll (loglikelihood_rolling)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", MC), ("gen", GEN), ("roll", ROLLING)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "lucid_mc.yaml").write_text(_yaml("lucid_mc", directory / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_target: answer\n"
        "doc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (directory / "lucid_gen.yaml").write_text(_yaml("lucid_gen", directory / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    (directory / "lucid_roll.yaml").write_text(_yaml("lucid_roll", directory / "roll.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")))
    return directory


def tiny_checkpoint(family: str, tokenizer_dir: pathlib.Path, directory: pathlib.Path, seed: int = 0):
    """A random tiny ``family`` model with the tokenizer of ``tokenizer_dir``, saved as an HF directory."""
    import torch
    import transformers as T
    from families import FAMILIES

    torch.manual_seed(seed)
    config = FAMILIES[family]()
    tok_config = json.loads((tokenizer_dir / "config.json").read_text())
    config.vocab_size = tok_config["vocab_size"]
    config.bos_token_id, config.eos_token_id = tok_config.get("bos_token_id"), tok_config.get("eos_token_id")
    config.pad_token_id = None
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    for path in tokenizer_dir.iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith((".safetensors", ".bin")) \
                and path.name != "generation_config.json":
            shutil.copy(path, directory / path.name)
    return directory
