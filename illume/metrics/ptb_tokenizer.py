"""COCO caption tokenization: Stanford PTBTokenizer (Java) and a pure-Python re-implementation of it.

The COCO caption metrics (pycocoevalcap) tokenize every caption with the Stanford CoreNLP 3.4.1
PTBTokenizer (`-preserveLines -lowerCase`) and then drop the tokens in `PUNCTUATIONS`. Scores are only
comparable with published ones when the tokenization is exactly that one, so this module offers:

* `java_ptb_tokenize`: the real tokenizer, run from the jar that ships with pycocoevalcap, with the same
  command line and post-processing as `pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`.
* `python_ptb_tokenize`: a pure-Python port of the PTBLexer 3.4.1 grammar (`PTBLexer.flex`, JFlex) that
  gives the same output for ordinary text, without Java and without a JVM start per call.
* `ptb_tokenize`: picks the Java one when a Java runtime is on PATH.

Both take a *batch* of captions and tokenize them as one newline-joined text, as pycocoevalcap does: a few
lexer rules look one line ahead (e.g. `no.` stays one token when the next line starts with a digit), so
the batch layout is part of the result.

Known differences of the Python port (none occurs in the VQA-X explanations; see tests/test_metrics.py):
letters and digits follow Python's Unicode tables rather than the older ones compiled into the 2014 jar
(so characters added or re-categorised since, e.g. Georgian Mtavruli, differ), and characters outside the
Basic Multilingual Plane (emoji) count as one character instead of two UTF-16 units when rules are
compared by match length. The scanner picks the longest match like JFlex, but inside one rule Python's
backtracking regexes take the first (greedy) match, which could differ from JFlex in pathological inputs
(none found in 10,000s of random lines).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
"""Tokens pycocoevalcap removes after tokenization (its list, verbatim).

The bracket names are upper case but the tokenizer lower-cases its output, so `-lrb-` etc. are kept, as in
the official evaluation.
"""

# Characters the lexer treats as line breaks. pycocoevalcap only replaces "\n" inside a caption, so a
# caption containing one of the others would shift every later caption by a line; we map them all to a
# space first (in both tokenizers), which only differs from pycocoevalcap where it would misalign.
_LINE_BREAKS = re.compile("\r\n|[\n\r\u2028\u2029\x0b\x0c]")

_JAR = "stanford-corenlp-3.4.1.jar"


def java_available() -> bool:
    """Whether a `java` executable is on PATH (needed for the official tokenizer and for METEOR)."""
    return shutil.which("java") is not None


def ptb_tokenize(sentences: Sequence[str], backend: str = "auto") -> list[str]:
    """Tokenize captions as the COCO caption evaluation does.

    Args:
        sentences: Captions; each becomes one line of the tokenizer input.
        backend: "java" (Stanford PTBTokenizer, needs Java), "python" (the pure-Python port), or "auto"
            (Java when `java` is on PATH, else Python).

    Returns:
        One string per caption: lower-cased tokens joined by single spaces, punctuation removed.
    """
    implementation = backend
    if implementation == "auto":
        implementation = "java" if java_available() else "python"
    if implementation == "java":
        return java_ptb_tokenize(sentences)
    if implementation == "python":
        return python_ptb_tokenize(sentences)
    raise ValueError(f"unknown tokenizer backend {backend!r}; expected 'auto', 'java' or 'python'")


def _postprocess(line: str) -> str:
    # Exactly pycocoevalcap's filter, including rstrip() (which also strips Unicode spaces).
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def java_ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Tokenize with the Stanford PTBTokenizer jar shipped in pycocoevalcap.

    Same command line and output handling as pycocoevalcap's `PTBTokenizer.tokenize`, but the input file
    goes to the system temporary directory (not into site-packages) and Java's progress line on stderr is
    captured instead of printed.

    Args:
        sentences: Captions, one per line of tokenizer input.

    Returns:
        One tokenized caption per input.

    Raises:
        FileNotFoundError: If `java` is not on PATH.
        RuntimeError: If the tokenizer fails or returns a different number of lines.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer  # imported here: only needed to locate the jar

    if not sentences:
        return []
    java = shutil.which("java")
    if java is None:
        raise FileNotFoundError("java not found on PATH; install a Java runtime (e.g. default-jre-headless)")
    jar = Path(ptbtokenizer.__file__).with_name(_JAR)
    text = "\n".join(_LINE_BREAKS.sub(" ", s) for s in sentences)
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="ptb_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        proc = subprocess.run([*cmd, path], capture_output=True, check=False)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    lines = proc.stdout.decode().split("\n")
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} captions")
    return [_postprocess(line) for line in lines]


def python_ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Tokenize like `java_ptb_tokenize`, in pure Python (a port of the PTBLexer 3.4.1 grammar).

    Args:
        sentences: Captions, one per line of tokenizer input.

    Returns:
        One tokenized caption per input.
    """
    if not sentences:
        return []
    text = "\n".join(_LINE_BREAKS.sub(" ", s) for s in sentences)
    lines = _lexer().tokenize(text)
    return [_postprocess(" ".join(tokens).lower()) for tokens in lines]


# --------------------------------------------------------------------------------------------------------
# The PTBLexer 3.4.1 grammar. Macros and rules follow PTBLexer.flex (CoreNLP tag v3.4.1) in the same order.
# JFlex's %caseless makes literal strings case-insensitive but not character classes, so literals are
# wrapped in (?ai:...) and classes are left as they are. `{NAME}` refers to a macro, as in JFlex.
# Top-level alternatives of a rule are separate patterns, because Python's `|` takes the first alternative
# that matches while JFlex takes the longest.
# --------------------------------------------------------------------------------------------------------

_MACROS: dict[str, str] = {
    "SGML": r"""<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"""
    r"""[ ]*=[ ]*(?:'[^']*'|"[^"]*")|[A-Za-z][A-Za-z0-9_:.\-]*))*[ ]*/?|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>""",
    "SPMDASH": r"&(?ai:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]",
    "SPAMP": r"&(?ai:amp);",
    "SPPUNC": r"&(?ai:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);",
    "SPLET": r"&[aeiouAEIOU](?ai:acute|grave|uml);",
    "SPACE": r"[ \t\u00A0\u2000-\u200A\u3000]",
    "NEWLINE": r"\r\n|[\r\n\u2028\u2029\x0b\x0c\x85]",
    "SPACENL": r"{SPACE}|{NEWLINE}",
    "SENTEND": r"{SPACENL}(?:{SPACENL}|[<UPPER>]|{SGML})",
    "DIGIT": r"[<DIGIT>]",
    "DATE": r"{DIGIT}{1,2}[\-/]{DIGIT}{1,2}[\-/]{DIGIT}{2,4}",
    "NUM": r"{DIGIT}*(?:[.:,\u00AD\u066B\u066C]{DIGIT}+)+|{DIGIT}+",
    "NUMBER": r"[\-+]?{NUM}",
    "SUBSUPNUM": r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)",
    "FRAC": r"(?:{DIGIT}{1,4}[\- \u00A0])?{DIGIT}{1,4}(?:\\?/|\u2044){DIGIT}{1,4}",
    "FRAC2": r"[\u00BC\u00BD\u00BE\u2153-\u215E]",
    "DOLSIGN": r"[A-Z]*\$|#",
    "DOLSIGN2": r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
    # [:letter:] plus the extra marks PTBLexer adds (soft hyphen, combining marks, ...), and SPLET.
    "LETTER": r"[<LETTER><LETTER_EXTRA>]|{SPLET}",
    "LETTERDIGIT": r"[<LETTER><LETTER_EXTRA><DIGIT>]|{SPLET}",
    "WORD": r"{LETTER}{LETTERDIGIT}*(?:[.!?]{LETTER}{LETTERDIGIT}*)*",
    "FILENAME_EXT": r"(?ai:bat|bmp|class|cgi|cpp|c|dll|docx|doc|exe|gif|gz|html|htm|h|jar|java|jpeg|jpg"
    r"|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|xml|x|zip)",
    "FILENAME": r"{LETTERDIGIT}+(?:\.{LETTERDIGIT}+)*\.{FILENAME_EXT}",
    "LD": r"[<LETTER><DIGIT>]",  # [:letter:]|[:digit:] without PTBLexer's extras
    "THING": r"(?:[dDoOlL]{APOSETCETERA}{LD})?{LD}+(?:{HYPHEN}(?:[dDoOlL]{APOSETCETERA}{LD})?{LD}+)*",
    "THINGA": r"[A-Z]+(?:(?:[+&]|{SPAMP})[A-Z]+)+",
    "THING3": r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}",
    "APOS": r"['\u0092\u2019]|&(?ai:apos);",
    "APOSETCETERA": r"{APOS}|[`\u0091\u2018\u201B]",
    # The ACRO2 alternative first: it is the longer one where both match.
    "HTHING": r"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{ACRO2}\.|[A-Za-z0-9\u00AD]+))+",
    "REDAUX": r"{APOS}(?:[msdMSD]|(?ai:re|ve|ll))",
    "SWORD": r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*",
    "SREDAUX": r"(?ai:n){APOSETCETERA}(?ai:t)",
    "APOWORD2": r"(?ai:y){APOS}",
    "FULLURL": r"""(?ai:https?)://[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},\-]""",
    "URLPATH": r"""(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},\-])?""",
    "EMAIL": r"""(?:&(?ai:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00A0{}]*@"""
    r"""(?:[^ \t\n\f\r"<>|(){}.\u00A0]+\.)*[^ \t\n\f\r"<>|(){}.\u00A0]+(?:&(?ai:gt);|>)?""",
    "ABMONTH": r"(?ai:jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)",
    "ABDAYS": r"(?ai:mon|tues|tue|wed|thurs|thu|fri)",
    # PTBLexer makes some states case-sensitive ([A]z, [M]ass, ...) as they are also common words.
    "ABSTATE": r"(?ai:ala|ariz)|A(?ai:z)|A(?ai:rk)|(?ai:calif|colo|conn|ct|dak)|D(?ai:el)|(?ai:fla|ga)"
    r"|I(?ai:ll)|(?ai:ind|kans|kan|ky)|L(?ai:a)|M(?ai:ass)|(?ai:md|mich|minn)|M(?ai:iss)"
    r"|(?ai:mo|mont|neb|nev|okla)|O(?ai:re)|P(?ai:a)|(?ai:penn|tenn)|T(?ai:ex)|(?ai:va|vt)|W(?ai:ash)"
    r"|(?ai:wisc|wis|wyo)",
    "ABCOMP": r"(?ai:inc|cos?|corp)|(?ai:pp?t)[ye](?ai:s)?|(?ai:ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys)",
    "ABNUM": r"(?ai:tel|est|ext|sq)",
    "ABPTIT": r"(?ai:jr|sr|bros|ed\.d|ph\.d|blvd|rd|esq)",
    "ABBREV1": r"(?:{ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|(?ai:etc|al|seq|bldg))\.",
    "ACROSPECIAL": r"(?ai:(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))",
    "ACRO": r"{ACROSPECIAL}|[A-Za-z](?:\.[A-Za-z])*",
    "ACRO2": r"{ACROSPECIAL}|[A-Za-z](?:\.[A-Za-z])+",
    "ABTITLE": r"(?ai:mrs|mr|ms)|M(?ai:iss)|(?ai:drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?"
    r"|adm|rev|maj|sgt|cpl|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst"
    r"|assoc|ens|insp|mlle|mme|msgr|sfc)",
    "ABCOMP2": r"(?ai:invt|elec|natl)|(?ai:m)[ft](?ai:g)|(?ai:dept)",
    "ABBREV4": r"{ABTITLE}|(?ai:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph)|{ACRO}|{ABCOMP2}",
    "ABBREV3": r"(?ai:ca|figs?|prop|nos?|art|bldg|pp|op)\.",
    "HYPHEN": r"[\-_\u058A\u2010\u2011]",
    "INSENTP": r"[,;:\u3001]",
    "DBLQUOT": r'"|&(?ai:quot);',
    "QUOTECHAR": r"[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A"
    r"\u00AB\u00BB]",
    "ASIANSMILEYCHAR": r"[\-\^x=~<>']",
    "MISCSYMBOL": r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387\u05BE"
    r"\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D"
    r"\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B"
    r"\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB"
    r"\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]",
}

# Extra "letters" of PTBLexer's LETTER macro (mostly combining marks), verbatim.
_LETTER_EXTRA = (
    r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u0384\u0385\u03CF"
    r"\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1"
    r"\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F"
    r"\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E"
    r"\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3"
    r"\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD"
    r"\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC"
    r"\u0EC8-\u0ECD"
)

# Words that may follow an acronym which then ends a sentence ("U.S. The ..."); first letter case-sensitive.
_SENTENCE_STARTERS = (
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
    "Now Once One Other Our She Since So Some Such That The Their Then There These They This We When While "
    "What Yet You"
).split()


def _char_class(predicate: Callable[[str], bool]) -> str:
    """A regex character-class body for the BMP characters satisfying `predicate` (JFlex sees UTF-16)."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF or not predicate(chr(code)):
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(f"\\u{a:04X}" if a == b else f"\\u{a:04X}-\\u{b:04X}" for a, b in ranges)


def _expand(pattern: str, classes: dict[str, str]) -> str:
    """Expand `{MACRO}` references (recursively) and `<CLASS>` placeholders."""
    for _ in range(10):  # macros nest a few levels deep
        expanded = re.sub(r"\{([A-Z][A-Z0-9_]*)\}", lambda m: f"(?:{_MACROS[m.group(1)]})", pattern)
        if expanded == pattern:
            break
        pattern = expanded
    return re.sub(r"<([A-Z_]+)>", lambda m: classes[m.group(1)], pattern)


@dataclass(frozen=True)
class _Rule:
    """One lexer rule: alternative patterns (each with an optional trailing context) and an action."""

    patterns: tuple[re.Pattern[str], ...]
    action: Callable[[str], list[str]] | str
    """Maps the matched text to tokens; or a string naming a special action."""


def _apply_nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


def _remove_soft_hyphens(text: str) -> str:
    return text.replace("\u00ad", "") or "-"


def _latex_quotes(text: str, probably_left: bool) -> str:
    if probably_left:
        text = re.sub("&apos;|'", "`", text)
        text = re.sub('"|&quot;', "``", text)
    else:
        text = re.sub("&apos;|'", "'", text)
        text = re.sub('"|&quot;', "''", text)
    text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203a]", "'", text)
    text = re.sub("[\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_BRACKETS = {"{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-", "(": "-LRB-", ")": "-RRB-"}


def _one(fn: Callable[[str], str] = lambda t: t) -> Callable[[str], list[str]]:
    return lambda text: [fn(text)]


def _skip(text: str) -> list[str]:
    return []


class _Lexer:
    """A longest-match scanner over the PTBLexer rules, like the JFlex-generated Java class."""

    # Plain ASCII words followed by a space are by far the most common token; any rule that could match
    # more at such a position returns the same text, except the few words split by the lexer.
    _FAST_WORD = re.compile(r"[A-Za-z]+(?=[ \t\n]|\Z)")
    _SPLIT_WORDS = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})
    _FAST_SPACE = re.compile(r"[ \t]+")

    def __init__(self) -> None:
        classes = {
            "LETTER": _char_class(lambda c: unicodedata.category(c).startswith("L")),
            "DIGIT": _char_class(lambda c: unicodedata.category(c) == "Nd"),
            "UPPER": _char_class(str.isupper),
            "LETTER_EXTRA": _LETTER_EXTRA,
        }

        def rule(
            action: Callable[[str], list[str]] | str, *alternatives: str, trail: str | None = None
        ) -> _Rule:
            # The trailing context is matched (not looked ahead) because JFlex compares rules on the length
            # of the match including it; the scanner then resumes where the `trail` group starts.
            suffix = "" if trail is None else f"(?P<trail>{_expand(trail, classes)})"
            compiled = tuple(re.compile(f"(?:{_expand(alt, classes)}){suffix}") for alt in alternatives)
            return _Rule(compiled, action)

        starters = "|".join(f"[{w[0]}](?ai:{w[1:]})" if len(w) > 1 else f"[{w}]" for w in _SENTENCE_STARTERS)
        self.rules: list[_Rule] = [
            rule(_one(), r"(?ai:c)[+][+]", r"(?ai:c|f)#"),
            rule("pushback3", r"(?ai:cannot)", r"(?ai:'twas)"),
            rule("pushback2", r"(?ai:'tis)", r"(?ai:gonna|gotta|lemme|gimme|wanna)"),
            rule(_one(_apply_nbsp), "{SGML}"),
            rule(_one(lambda t: "--"), "{SPMDASH}"),
            rule(_one(lambda t: "&"), "{SPAMP}"),
            rule(_one(), "{SPPUNC}"),
            rule(_one(_remove_soft_hyphens), "{WORD}", trail="{REDAUX}"),
            rule(_one(_remove_soft_hyphens), "{SWORD}", trail="{SREDAUX}"),
            rule(_one(_remove_soft_hyphens), "{WORD}"),
            rule(
                _one(),
                r"{APOS}(?ai:n){APOS}?",
                r"[lLdDjJ]{APOS}",
                r"(?ai:dunkin|somethin|ol){APOS}",
                r"{APOS}(?ai:em)",
                r"[A-HJ-XZn]{APOSETCETERA}[<LETTER>]{2,}",
                r"{APOS}[2-9]0(?ai:s)",
                r"{APOS}(?ai:till?)",
                r"[<LETTER>]+[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z][<LETTER>]*",
                r"{APOS}(?ai:cause)",
                r"(?ai:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
                r"(?ai:o){APOSETCETERA}(?ai:o)",
            ),
            rule(_one(), "{APOWORD2}", trail="[<LETTER>]"),
            rule(_one(), "{FULLURL}"),
            rule(
                _one(),
                r"""(?ai:www)\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}{URLPATH}""",
                r"""(?:[^ \t\n\f\r"`'<>|.!?(){},-_$]+\.)+(?ai:com|net|org|edu){URLPATH}""",
            ),
            rule(_one(), "{EMAIL}"),
            rule(_one(), r"@[a-zA-Z_][a-zA-Z_0-9]*", r"#{LETTER}+"),
            rule(_one(lambda t: _latex_quotes(t, False)), "{REDAUX}", trail="[^A-Za-z]"),
            rule(_one(lambda t: _latex_quotes(t, False)), "{SREDAUX}", trail="[^A-Za-z]"),
            rule(_one(), "{DATE}"),
            rule(_one(_remove_soft_hyphens), "{NUMBER}"),
            rule(_one(), "{SUBSUPNUM}"),
            rule(_one(_apply_nbsp), "{FRAC}"),
            rule(_one(lambda t: _FRACTIONS.get(t, t)), "{FRAC2}"),
            rule(
                _one(lambda t: re.sub("(?i:&amp;)", "&", t)),
                r"-(?ai:rrb|lrb|rcb|lcb|rsb|lsb)-",
                r"(?ai:c\.d\.s|pro-|anti-)",
                r"(?ai:s)(?:&|{SPAMP})(?ai:p-500|ls)",
                r"(?ai:cap){APOS}(?ai:n)",
                r"(?ai:c){APOS}(?ai:est)",
            ),
            rule(_one(), "{THING3}"),
            rule(_one(), "{DOLSIGN}"),
            rule(_one(lambda t: _CURRENCY.get(t, t)), "{DOLSIGN2}"),
            rule(
                "acronym",
                r"(?:{ACRO})\.",
                trail=rf"(?:{{SPACENL}})+(?:{starters}|[M](?ai:r|s)\.|{{SGML}})"
                r"(?:{SPACENL})",
            ),
            rule(_one(), "{ABBREV3}", trail=r"(?:{SPACENL})?[<DIGIT>]"),
            rule(_one(), r"(?ai:pt)[eyEY]\.|(?ai:co)\.", trail=r"{SPACE}(?ai:ltd|lim)"),
            rule("abbrev1", "{ABBREV1}", trail="{SENTEND}"),
            rule(_one(), "{ABBREV1}", trail=r"[\s\S]{2}"),
            rule("abbrev1", "{ABBREV1}"),
            rule(_one(), r"(?:{ABBREV4})\."),
            rule(_one(), "{ABBREV4}", trail="{SPACE}"),
            rule(_one(), "{ACRO}", trail="{SPACENL}"),
            rule(_one(), r"{APOS}[0-9][0-9]", trail="{SPACENL}"),
            rule(_one(), "{FILENAME}", trail=r"{SPACENL}|[.?!,]"),
            rule(_one(_remove_soft_hyphens), r"{WORD}\.", trail="{INSENTP}"),
            rule(
                _one(lambda t: _parens(_apply_nbsp(t))),
                r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
                r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}",
                r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
            ),
            rule(_one(lambda t: _latex_quotes(t, True)), "{DBLQUOT}", trail="[A-Za-z0-9$]"),
            rule(_one(lambda t: _latex_quotes(t, False)), "{DBLQUOT}"),
            rule(_skip, "\x7f"),
            rule(_one(lambda t: "<"), r"<|&(?ai:lt);"),
            rule(_one(lambda t: ">"), r">|&(?ai:gt);"),
            rule(_one(_parens), r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", trail="[^A-Za-z0-9]"),
            rule(
                _one(_parens),
                # The first alternative is PTBLexer's, typo included (it matches a literal "[^x=~<>]").
                r"[\^x=~<>]\.\[\^(?ai:x)=~<>\]",
                r"{ASIANSMILEYCHAR}_{ASIANSMILEYCHAR}",
                r"\({ASIANSMILEYCHAR}[_.]?{ASIANSMILEYCHAR}\)",
                r"\([\^x=~<>']-[\^x=~<>'`]\)",
            ),
            rule(_one(lambda t: _BRACKETS[t]), r"[{}\[\]()]"),
            rule(_one(lambda t: "--" if 3 <= len(t) <= 4 else t), r"-+"),
            rule(_one(lambda t: "..."), r"\.{3,5}", r"(?:\.[ \u00A0]){2,4}\.", r"[\u0085\u2026]"),
            rule(_one(), r"@+", r"#+", r"_+"),
            rule(_one(), r"\*+", r"(?:\\\*){1,3}"),
            rule(_one(), "{INSENTP}"),
            rule(_one(), r"[?!]+"),
            rule(_one(), "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
            rule(_one(), "="),
            rule(_one(), "/"),
            rule(_one(_remove_soft_hyphens), r"{HTHING}\.", trail="{INSENTP}"),
            rule(_one(_remove_soft_hyphens), "{HTHING}"),
            rule(_one(), r"{THING}\.", trail="{INSENTP}"),
            rule(_one(), "{THING}"),
            rule(_one(lambda t: re.sub("(?i:&amp;)", "&", t)), r"{THINGA}\.", trail="{INSENTP}"),
            rule(_one(lambda t: re.sub("(?i:&amp;)", "&", t)), "{THINGA}"),
            rule(_one(lambda t: _latex_quotes(t, True)), "'", trail="[A-Za-z][^ \t\n\r\u00a0]"),
            rule(_one(lambda t: _latex_quotes(t, False)), "{REDAUX}", "{SREDAUX}"),
            rule(_one(lambda t: _latex_quotes(t, False)), "{APOS}", "''", "{QUOTECHAR}{1,2}"),
            rule(_one(), "<<|>>"),
            rule(_one(), "{MISCSYMBOL}"),
            rule(_skip, r"\x00|{SPACE}+|[\u200B\u200E\u200F\uFEFF]"),
            rule("newline", "{NEWLINE}"),
            rule(_skip, r"&(?ai:nbsp);"),
            rule(_skip, r"[\s\S]"),  # untokenizable: PTBTokenizer deletes it (and logs the first one)
        ]

    def tokenize(self, text: str) -> list[list[str]]:
        """Split `text` into lines of tokens (before lower-casing and punctuation removal)."""
        lines: list[list[str]] = [[]]
        pos, end = 0, len(text)
        while pos < end:
            fast = self._FAST_WORD.match(text, pos)
            if fast and fast.group().lower() not in self._SPLIT_WORDS:
                lines[-1].append(fast.group())
                pos = fast.end()
                continue
            fast = self._FAST_SPACE.match(text, pos)
            if fast:
                pos = fast.end()
                continue
            pos = self._step(text, pos, lines)
        return lines

    def _step(self, text: str, pos: int, lines: list[list[str]]) -> int:
        """Apply the rule with the longest match at `pos` (earliest rule on ties); return the new position."""
        best_rule, best_match, best_len = None, None, 0
        for candidate in self.rules:
            for pattern in candidate.patterns:
                match = pattern.match(text, pos)
                if match and match.end() - pos > best_len:
                    best_rule, best_match, best_len = candidate, match, match.end() - pos
        assert best_rule is not None and best_match is not None  # the last rule matches any character
        stop = best_match.start("trail") if "trail" in best_match.re.groupindex else best_match.end()
        token = text[pos:stop]
        action = best_rule.action
        if action == "newline":
            lines.append([])
        elif action == "pushback3":
            lines[-1].append(token[:-3])
            stop -= 3
        elif action == "pushback2":
            lines[-1].append(token[:-2])
            stop -= 2
        elif action in ("abbrev1", "acronym"):
            # The period is returned again as its own token; a one-letter acronym ("I.") loses it.
            if action == "acronym" and len(token) == 2:
                token = token[:-1]
            lines[-1].append(token)
            stop -= 1
        else:
            assert callable(action)
            lines[-1].extend(action(token))
        return stop


@functools.cache
def _lexer() -> _Lexer:
    # Built on first use: the Unicode classes take a moment and nothing should happen at import.
    return _Lexer()
