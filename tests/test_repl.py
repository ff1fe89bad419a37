"""lucidlm chat through a pseudo-terminal (pexpect): Ctrl-C during a reply keeps the conversation,
the slash commands, Ctrl-C at the prompt; and the piped mode that marks the turns."""

import json
import os
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")



def child_env():  # read when a child starts: the session's fixtures set $LUCIDLM_CACHE after import
    return {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}


def spawn(model_dir, *options):
    child = pexpect.spawn(sys.executable, ["-m", "lucidlm", "chat", "--model", str(model_dir), *options],
                          encoding="utf-8", timeout=180, env=child_env(), dimensions=(40, 200))
    child.expect(f"Chatting with {model_dir.name}\\.")  # the checkpoint's name, not its path
    child.expect_exact("> ")
    return child


def finish(child):
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")


def saved(path):
    return json.loads(path.read_text())


def test_ctrl_c_stops_a_reply_and_keeps_the_conversation(tiny_lm_dir, tmp_path):
    child = spawn(tiny_lm_dir, "--max-new-tokens", "200", "--temperature", "1", "--seed", "0")
    for attempt in range(3):  # a machine fast enough to write 200 tokens before the Ctrl-C lands: again
        child.sendline(f"Tell me a long story, part {attempt}")
        child.expect_exact(f"part {attempt}\r\n")  # the terminal's echo of the line
        child.expect(r"\S")  # the reply's first characters
        child.sendintr()
        if child.expect([r"\(reply stopped", r"\n> "]) == 0:
            break
    else:
        pytest.fail("every reply ended before Ctrl-C arrived")
    child.expect_exact("> ")
    path = tmp_path / "chat.json"
    child.sendline(f"/save {path}")
    child.expect_exact(f"wrote {path}")
    messages = saved(path)["messages"]
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * (attempt + 1)  # the stopped reply is the last assistant turn
    assert messages[-2]["content"] == f"Tell me a long story, part {attempt}"
    assert messages[-1]["content"].strip()  # what was printed before Ctrl-C
    child.sendline("/quit")
    finish(child)


def test_slash_commands(tiny_lm_dir, tmp_path):
    child = spawn(tiny_lm_dir, "--max-new-tokens", "4")
    child.sendline("/help")
    child.expect_exact("/explain [N]")
    child.sendline("/explain")
    child.expect_exact("nothing to explain yet")
    child.sendline("/system You are terse.")
    child.expect_exact("(system message set)")
    child.sendline("Hello there")
    child.expect_exact("Hello there\r\n")
    child.sendline("/explain 1")  # typed while the reply streams: read after it
    child.expect(r"target .* method attnlrp")
    child.sendline("/explain 99")
    child.expect_exact("N is a token of the last reply, 0 to")
    child.sendline("/bogus")
    child.expect_exact("unknown command /bogus: /help lists the commands")
    child.expect_exact("> ")
    child.send("\x1b[A\r")  # arrow up: readline's history brings the last line back
    child.expect_exact("unknown command /bogus: /help lists the commands")
    first = tmp_path / "one.json"
    child.sendline(f"/save {first}")
    child.expect_exact(f"wrote {first}")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.sendline("/system")
    child.expect_exact("(system message removed)")
    second = tmp_path / "two.json"
    child.sendline(f"/save {second}")
    child.expect_exact(f"wrote {second}")
    child.sendline("/quit")
    finish(child)

    one = saved(first)
    assert one["model"] == tiny_lm_dir.name
    assert [m["role"] for m in one["messages"]] == ["system", "user", "assistant"]
    assert one["messages"][0]["content"] == "You are terse." and one["messages"][1]["content"] == "Hello there"
    assert saved(second)["messages"] == []


def test_ctrl_c_and_ctrl_d_at_the_prompt_leave_cleanly(tiny_lm_dir):
    child = spawn(tiny_lm_dir)
    child.sendintr()
    finish(child)
    child = spawn(tiny_lm_dir)
    child.sendeof()
    finish(child)


def test_piped_chat_marks_the_turns(tiny_lm_dir, tmp_path):
    path = tmp_path / "piped.json"
    done = subprocess.run([sys.executable, "-m", "lucidlm", "chat", "--model", str(tiny_lm_dir),
                           "--max-new-tokens", "3"], input=f"Hi\n\n//slash\n/save {path}\n", capture_output=True,
                          text=True, timeout=180, env=child_env())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "user: Hi" and lines[1].startswith("assistant: ")
    assert "user: /slash" in lines  # // sends a message that starts with /
    assert [m["content"] for m in saved(path)["messages"] if m["role"] == "user"] == ["Hi", "/slash"]
