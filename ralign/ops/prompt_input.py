"""Prompts typed or listed by a person (`ralign generate --prompt / --prompts-file`) or sent to a reward server (HTTP
`prompts`), checked by one rule (`prompt_problem`) before a model is loaded or a file written. Each problem is one
line naming where the prompt came from (`FILE:LINE`, `--prompt N`, `prompts[N]`) and what is wrong with it.

What happens to each kind of input:
- blank lines (empty, or whitespace only): skipped and reported; a trailing newline or a spacer line is no prompt;
- bytes that are not UTF-8: refused, naming the line and the byte; a UTF-8 byte-order mark at the start is accepted;
- lone surrogates (what an argument holding bytes that are not UTF-8 decodes to, or a JSON `\\ud800`): refused;
- control characters (C0 and C1 codes except tab, DEL, Unicode line / paragraph separators, bidirectional
  overrides and isolates): refused. Some would split a line where an editor shows one (form feed, vertical tab,
  U+2028 count as line breaks for `str.splitlines`), others make the text display differently from what the model
  reads;
- a prompt over `MAX_PROMPT_CHARS` characters: refused before anything tokenises it;
- a prompt longer than the policy's text encoding reads (`check_token_budget`, once the model is loaded): refused,
  or with `allow_truncation` reported and generated from what fits.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ralign.config import UserError

# The Serve ingress's default `http.max_prompt_chars`: one limit for prompts wherever they come from.
MAX_PROMPT_CHARS = 4000
MAX_FILE_BYTES = 64 * 1024 * 1024
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_UTF8_BOM = b"\xef\xbb\xbf"


class PromptInputError(UserError):
    """A prompt that cannot be used; one line naming where it came from and why."""


@dataclass(frozen=True)
class Prompt:
    text: str
    where: str  # "prompts.txt:3" or "--prompt 2"


def _control_character(text: str) -> tuple[int, str] | None:
    for column, ch in enumerate(text, 1):
        if ch == "\t":
            continue
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") or ch in _BIDI_CONTROLS:
            return column, ch
    return None


def prompt_problem(text: str, max_chars: int = MAX_PROMPT_CHARS) -> str | None:
    """What is wrong with a prompt, as a phrase (None: nothing). The one rule for every entry point."""
    bad = _control_character(text)
    if bad:
        column, ch = bad
        if unicodedata.category(ch) == "Cs":
            return f"a lone surrogate U+{ord(ch):04X} at column {column} (text that was not valid UTF-8)"
        return (f"control character U+{ord(ch):04X} at column {column}; a prompt must be plain text on one line, "
                "without control characters")
    if len(text) > max_chars:
        return f"{len(text)} characters; a prompt may have at most {max_chars}"
    if not text.strip():
        return "empty prompt"
    return None


def check_prompt(text: str, where: str, max_chars: int = MAX_PROMPT_CHARS) -> Prompt:
    """The prompt with surrounding whitespace removed, or PromptInputError naming `where` and the problem."""
    problem = prompt_problem(text, max_chars)
    if problem:
        raise PromptInputError(f"{where}: {problem}")
    return Prompt(text.strip(), where)


def read_prompt_file(path: str | Path) -> tuple[list[Prompt], list[int]]:
    """(prompts, numbers of the blank lines skipped) of a UTF-8 file with one prompt per line; lines end at "\\n"
    (a "\\r" before it is dropped), and nothing else ends a line."""
    path = Path(path)
    if not path.exists():
        raise PromptInputError(f"{path}: no such file")
    if not path.is_file():
        raise PromptInputError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PromptInputError(f"{path}: {size} bytes; a prompt file may hold at most {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptInputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    data = data.removeprefix(_UTF8_BOM)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    prompts: list[Prompt] = []
    blank: list[int] = []
    for number, raw in enumerate(lines, 1):
        raw = raw.removesuffix(b"\r")
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptInputError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)") from None
        if not text.strip() and _control_character(text) is None:
            blank.append(number)
            continue
        prompts.append(check_prompt(text, where))
    if not prompts:
        raise PromptInputError(f"{path}: no prompts (the file is empty or holds blank lines only)")
    return prompts, blank


def check_token_budget(prompts: Sequence[Prompt], overflow: Callable[[str], str | None], allow_truncation: bool) -> list[str]:
    """Refuse the first prompt that `overflow` (the policy's text encoding) would cut short; with `allow_truncation`,
    return one note per such prompt instead."""
    notes = []
    for p in prompts:
        problem = overflow(p.text)
        if problem is None:
            continue
        if not allow_truncation:
            raise PromptInputError(f"{p.where}: {problem}; shorten it, or pass --truncate to generate from what fits")
        notes.append(f"{p.where}: {problem}")
    return notes


def describe_lines(numbers: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")
