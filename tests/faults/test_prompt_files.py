"""Bad prompt input to `ralign generate` (the one command that reads prompts from a person: `--prompt` and
`--prompts-file`; training and evaluation prompts come from the toy world's generator). Each refusal is one line
naming FILE:LINE (or --prompt N) and the problem, exit code 2, and no output directory; blank lines are skipped and
reported. What each case does is decided in ralign/ops/prompt_input.py."""

from __future__ import annotations

import re

import pytest

from ralign.ops.prompt_input import MAX_PROMPT_CHARS, PromptInputError, check_prompt, read_prompt_file
from ralign.world.prompts import generate

from .checkpoints import policy_spec, write_checkpoint
from .cli_runs import ralign_process

# Both over the toy text encoder's 24 tokens; after segment encoding the first is 32 tokens, the second 59.
LONG = [s.prompt for s in generate("long", 2, "test", seed=3)]

# (file bytes, the line the error names, what it says)
REFUSED = {
    "not UTF-8": (b"a red circle\ntwo blue squares\na gr\xe9en triangle\n", 3, "not UTF-8 (byte 0xe9 at byte 5 of the line)"),
    "Latin-1 file": ("a red circle\nun cercle rouge très joli\n".encode("latin-1"), 2, "not UTF-8"),
    "NUL byte": (b"a red circle\x00\n", 1, "control character U+0000 at column 13"),
    "form feed": (b"a red circle\na blue\x0csquare\n", 2, "control character U+000C at column 7"),
    "escape sequence": (b"\x1b[31ma red circle\n", 1, "control character U+001B at column 1"),
    "lone carriage return": (b"a red circle\ra blue square\n", 1, "control character U+000D at column 13"),
    "line separator": ("a red circle\u2028a blue square\n".encode(), 1, "control character U+2028 at column 13"),
    "bidi override": ("a red \u202ecircle\n".encode(), 1, "control character U+202E at column 7"),
    "C1 control": ("a red circle\u0085\n".encode(), 1, "control character U+0085 at column 13"),
    "huge prompt": (b"a red circle\n" + b"x" * (MAX_PROMPT_CHARS + 1) + b"\n", 2, f"{MAX_PROMPT_CHARS + 1} characters; a prompt may have at most"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_prompt_file_problems_are_refused_naming_the_line(tmp_path, case):
    data, line, needle = REFUSED[case]
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    with pytest.raises(PromptInputError) as err:
        read_prompt_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: ") and needle in message and "\n" not in message, message


def test_blank_lines_are_skipped_and_reported_and_line_endings_kept_apart(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbfa red circle\r\n\r\n   \n\ttwo blue squares  \n\t\nthree green triangles")
    prompts, blank = read_prompt_file(path)
    assert [p.text for p in prompts] == ["a red circle", "two blue squares", "three green triangles"]
    assert [p.where for p in prompts] == [f"{path}:1", f"{path}:4", f"{path}:6"]  # numbered as an editor shows them
    assert blank == [2, 3, 5]


@pytest.mark.parametrize("data, needle", [
    (b"", "no prompts (the file is empty"),
    (b"\n  \n\t\n", "no prompts (the file is empty or holds blank lines only)"),
])
def test_a_file_without_prompts_is_refused(tmp_path, data, needle):
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    with pytest.raises(PromptInputError, match=re.escape(needle)):
        read_prompt_file(path)


def test_prompt_option_is_checked_like_a_line():
    assert check_prompt("  a red circle ", "--prompt 1").text == "a red circle"
    with pytest.raises(PromptInputError, match=r"^--prompt 2: control character U\+000A at column 6"):
        check_prompt("a red\ncircle", "--prompt 2")
    with pytest.raises(PromptInputError, match="^--prompt 3: empty prompt"):
        check_prompt("   ", "--prompt 3")


@pytest.mark.parametrize("case", ["not UTF-8", "form feed", "huge prompt"])
def test_generate_refuses_a_bad_prompt_file_before_loading_anything(ralign_cli, tmp_path, case):
    data, line, needle = REFUSED[case]
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    out = tmp_path / "out"
    message = ralign_cli("generate", "--prompts-file", path, "--out", out).one_line_error()
    assert f"prompts.txt:{line}: " in message and needle in message
    assert not out.exists()


def test_generate_refuses_missing_and_unreadable_prompt_files(ralign_cli, tmp_path):
    out = tmp_path / "out"
    assert "nowhere.txt: no such file" in ralign_cli("generate", "--prompts-file", tmp_path / "nowhere.txt", "--out", out).one_line_error()
    assert "not a regular file" in ralign_cli("generate", "--prompts-file", tmp_path, "--out", out).one_line_error()
    assert "--prompt 2: empty prompt" in ralign_cli("generate", "--prompt", "a red circle", "--prompt", "", "--out", out).one_line_error()
    assert not out.exists()


def test_generate_refuses_prompts_its_plain_encoding_would_cut_off(ralign_cli, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "plain")
    path = tmp_path / "prompts.txt"
    path.write_text(f"a red circle\n\n{LONG[0]}\n")
    out = tmp_path / "out"
    outcome = ralign_cli("generate", "--checkpoint", checkpoint, "--prompts-file", path, "--out", out)
    message = outcome.err.strip().splitlines()[-1]
    assert outcome.code == 2 and message.startswith(f"error: {path}:3: ") and "the plain text encoding reads 24" in message, outcome.err
    assert "note: " in outcome.err and "skipped 1 blank line(s): 2" in outcome.err  # reported before the refusal
    assert not out.exists()


def test_generate_refuses_prompts_beyond_the_segment_budget(ralign_cli, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "segment", policy_spec(text_encoding="segment", segment_budget=32))
    fits, too_long = LONG
    out = tmp_path / "out"
    message = ralign_cli("generate", "--checkpoint", checkpoint, "--prompt", fits, "--prompt", too_long, "--out", out).one_line_error()
    assert message.startswith("error: --prompt 2: ") and "after segment encoding, but the budget is 32" in message, message
    assert not out.exists()


def test_truncate_generates_from_what_fits_and_says_so(ralign_cli, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "plain")
    out = tmp_path / "out"
    outcome = ralign_cli("generate", "--checkpoint", checkpoint, "--prompt", "a red circle", "--prompt", LONG[0],
                         "--truncate", "--out", out)
    assert outcome.code == 0, outcome.err
    assert "note: --prompt 2: " in outcome.err and "--truncate" in outcome.err
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "grid.png", "grid.txt", "prompts.txt"]
    assert (out / "prompts.txt").read_text().splitlines() == ["a red circle", LONG[0]]


def test_a_real_process_refuses_a_non_utf8_file_in_one_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(REFUSED["not UTF-8"][0])
    outcome = ralign_process("generate", "--prompts-file", path, "--out", tmp_path / "out")
    assert f"{path}:3: not UTF-8" in outcome.one_line_error()
    assert not (tmp_path / "out").exists()
