"""The command line: real subprocesses on the embedded model and tiny checkpoints."""

import subprocess
import sys

import pytest
import torch
import transformers

PROMPT = "The capital of France is"


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "lucidlm", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=600)


def test_generate_prints_only_the_completion(smollm2):
    done = cli("generate", PROMPT, "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    assert done.stdout == smollm2.generate(PROMPT, max_new_tokens=6) + "\n"  # greedy, as LLM.generate


def test_cache_tokens_alone_generates_with_the_window_policy(smollm2):
    done = cli("generate", PROMPT, "--max-new-tokens", "8", "--cache-tokens", "4")
    assert done.returncode == 0, done.stderr
    window = smollm2.generate(PROMPT, max_new_tokens=8, kv_cache="window", cache_tokens=4)
    assert window != smollm2.generate(PROMPT, max_new_tokens=8)  # the two policies tell apart here
    assert done.stdout == window + "\n"
    notes = [line for line in done.stderr.splitlines() if line.startswith("lucidlm: note: ")]
    assert notes == ["lucidlm: note: --cache-tokens 4 without --kv-cache: using the window policy (the latest "
                     "tokens); pass --kv-cache to choose another"]


@pytest.mark.parametrize("args, needle", [
    (["generate", "hi", "--max-new-tokens", "zero"], "--max-new-tokens"),
    (["generate", "hi", "--model", "/no/such/model"], "/no/such/model"),
    (["explain", "hi", "--method", "nope"], "--method"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_arguments_exit_2_with_one_line(args, needle):
    done = cli(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


def test_models_lists_registry_and_architectures():
    done = cli("models")
    assert done.returncode == 0
    assert "SmolLM2-135M" in done.stdout and "GPTNeoXForCausalLM" in done.stdout


def test_convert_hf_dir_roundtrip(hf_checkpoint, tmp_path):
    hf_model, directory = hf_checkpoint("phi3")
    out = tmp_path / "converted"
    done = cli("convert", directory, out)
    assert done.returncode == 0, done.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf_model(ids).logits, atol=0, rtol=0)
    assert cli("convert", directory, out).returncode == 2  # refuses to overwrite a non-empty dir


def test_chat_reads_turns_from_stdin(smollm2):
    """Piped, every non-empty line is a user turn and stdout marks the turns; no banner and no "> "
    prompt; /quit ends the session (the line after it is never answered); exit status 0."""
    questions = ["Hello!", "What is the capital of France?"]
    done = cli("chat", "--max-new-tokens", "12", input=f"{questions[0]}\n\n  {questions[1]}  \n/quit\nIgnored\n")
    assert done.returncode == 0, done.stderr
    messages, expected = [], []
    for question in questions:  # each reply sees the conversation so far, as LLM.chat does
        messages.append({"role": "user", "content": question})
        reply = smollm2.chat(messages, max_new_tokens=12)
        messages.append({"role": "assistant", "content": reply})
        expected += [f"user: {question}", f"assistant: {reply}"]
    assert done.stdout.splitlines() == expected  # hence no "> " prompt, and no answer to "Ignored"
    assert all(reply["content"].strip() for reply in messages[1::2])  # replies worth comparing
    assert "Chatting with" not in done.stderr  # the banner is for a terminal


def test_explain_writes_heatmaps(tmp_path):
    html, js, png = tmp_path / "e.html", tmp_path / "e.json", tmp_path / "e.png"
    done = cli("explain", PROMPT, "--html", html, "--json", js, "--png", png)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "\x1b[" not in done.stdout  # no colour codes when piped
    assert html.read_text().count("France") >= 1 and png.read_bytes()[:4] == b"\x89PNG"
    from lucidlm.explain.explanation import Explanation

    assert len(Explanation.from_json(js.read_text()).relevance) == 5  # one value per prompt token


def test_explain_target_hint_target_id_and_continuation_labels():
    done = cli("explain", PROMPT, "--target", "Paris")
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("lucidlm: note: ")]
    assert len(notes) == 1 and "' Paris'" in notes[0] and "7042" in notes[0]
    assert "Warning" not in done.stderr and "warnings.warn" not in done.stderr  # a note, not a Python warning
    done = cli("explain", PROMPT, "--target-id", "7042")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("target ' Paris' (logit") and "note" not in done.stderr
    done = cli("explain", PROMPT, "--target", " Paris is")  # a continuation
    assert done.returncode == 0, done.stderr
    title = done.stdout.splitlines()[0]
    assert "log-prob" in title and "logit" not in title


def test_convert_keeps_a_chat_template_that_lives_in_its_own_file(tiny_lm_dir, tmp_path):
    """transformers v5 saves the template as chat_template.jinja, not in tokenizer_config.json."""
    import json
    import shutil

    from lucidlm.tokenizer import Tokenizer

    source = tmp_path / "source"
    shutil.copytree(tiny_lm_dir, source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (source / "chat_template.jinja").write_text(template)
    out = tmp_path / "converted"
    done = cli("convert", source, out)
    assert done.returncode == 0, done.stderr
    assert (out / "chat_template.jinja").read_text() == template
    messages = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_dir(out).apply_chat_template(messages, add_generation_prompt=False) == "[user] hi\n"
