#!/usr/bin/env python3
"""tokenizer_ref.py - reference data for kiln's tokenizer tests.

kiln's tokenizer must give the same ids as Hugging Face `tokenizers` built by
transformers from the same GGUF file (AutoTokenizer.from_pretrained(dir,
gguf_file=...)), and render chats as transformers' apply_chat_template does.
This script writes what tests/test_tokenizer.c compares against, so the
tests run without Python:

  corpus OUT           the test corpus (tests/data/tokenizer/corpus.txt):
                       English prose and source code from Python's own
                       standard library, numbers and dates, whitespace runs
                       and tabs, CRLF, CJK (Python's cjkencodings test
                       texts), Arabic / Hebrew / Devanagari / Thai (glibc
                       locale data), emoji and ZWJ sequences, combining
                       marks, invalid UTF-8 bytes and special-token
                       strings; deterministic (seeded).  Made once and
                       committed: regenerating it elsewhere gives another
                       corpus (other Python version), which is fine.
  ids CORPUS OUTDIR    expected ids for every record of the corpus, one file
                       per tokenizer (expected-NAME.txt).
  chat OUTDIR          chat-template goldens (chat_golden.json).
  hf CORPUS OUTDIR     small Hugging Face model directories (hf-*/: a
                       tokenizer.json written by `tokenizers` itself, from a
                       1,000-token BPE trained on the corpus's prose and
                       code, + tokenizer_config.json) for each pipeline the
                       tokenizer.json loader reads, with the reference ids
                       of every 10th record (hf-*/expected.txt).

Records: each line of the corpus (without its '\\n'), then blocks of 8
consecutive lines joined by '\\n' with a final '\\n', for the first
N_BLOCKS * 8 lines (newline handling across lines).  A line that is not
valid UTF-8 reaches the reference as bytes.decode("utf-8", "replace"): the
reference takes str, and that is the conversion every Python caller makes;
kiln repairs its input the same way (src/tokenizer/encode.c).

Tokenizers (expected-NAME.txt; ids with add_special_tokens=False and the
reference's default of matching special tokens in the text; NAME-nosplit
files hold split_special_tokens=True ids of the records holding '<'):
  smollm2         SmolLM2-135M-Instruct GGUF (byte-level BPE, pre "smollm")
  smollm2-qwen2   same vocabulary, Qwen2's split pattern (transformers' own
                  Split + ByteLevel pipeline for pre "qwen2")
  smollm2-llama3  same vocabulary, Llama 3's split pattern, ignore_merges
                  (as Llama 3's tokenizer.json and llama.cpp have it)
  gemma3          Gemma 3 270M GGUF (SentencePiece, byte fallback), when
                  models/gemma-3-270m-q4_k_m.gguf exists

One deliberate deviation from transformers: its GGUF converter has no entry
for the "smollm" pre-tokenizer and so falls back to GPT-2's, which does not
split digits; SmolLM2's own tokenizer.json (and llama.cpp, from the same
GGUF key) put Digits(individual_digits=True) first.  The reference here
sets that pre-tokenizer, as transformers' set_split_regex does for the
families it knows; the script prints how many records the unpatched
converter would tokenize differently.

Set-up (once; transformers' GGUF path imports torch):
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install transformers tokenizers gguf sentencepiece \\
      protobuf numpy jinja2 torch
Regenerate (the corpus stays as committed):
  make tokenizer-ref
which runs
  .venv-ref/bin/python scripts/ref/tokenizer_ref.py ids \\
      tests/data/tokenizer/corpus.txt tests/data/tokenizer
  .venv-ref/bin/python scripts/ref/tokenizer_ref.py chat tests/data/tokenizer
  .venv-ref/bin/python scripts/ref/tokenizer_ref.py hf \
      tests/data/tokenizer/corpus.txt tests/data/tokenizer
"""
import json
import os
import random
import re
import sys

N_BLOCKS = 400
SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "models/gemma-3-270m-q4_k_m.gguf"

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------------------
# Corpus

def _stdlib_dir():
    import os as _os
    return _os.path.dirname(_os.__file__)


def _prose_lines(rng, n):
    """Sentences from the docstrings of the standard library."""
    import ast
    out = []
    files = sorted(f for f in os.listdir(_stdlib_dir()) if f.endswith(".py"))
    for f in files:
        try:
            tree = ast.parse(open(os.path.join(_stdlib_dir(), f), encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                text = " ".join(doc.split())
                for s in re.split(r"(?<=[.!?])\s+", text):
                    if 20 <= len(s) <= 300 and not s.startswith(">>>"):
                        out.append(s)
    rng.shuffle(out)
    return out[:n]


def _code_lines(rng, n):
    """Lines of the standard library's source, indentation kept; some with
    tabs for indentation; a few C lines from the system headers."""
    out = []
    files = sorted(f for f in os.listdir(_stdlib_dir()) if f.endswith(".py"))
    for f in files:
        try:
            lines = open(os.path.join(_stdlib_dir(), f), encoding="utf-8").read().split("\n")
        except UnicodeDecodeError:
            continue
        for ln in lines:
            if ln.strip() and len(ln) <= 160:
                out.append(ln)
    rng.shuffle(out)
    out = out[: n - n // 6]
    for i in range(0, len(out), 7):
        m = re.match(r"^( +)", out[i])
        if m:
            out[i] = "\t" * (len(m.group(1)) // 4) + out[i][len(m.group(1)):]
    c = []
    for h in ("stdio.h", "stdlib.h", "string.h", "pcre2.h", "jansson.h"):
        p = os.path.join("/usr/include", h)
        if os.path.exists(p):
            c += [ln for ln in open(p, encoding="utf-8", errors="replace").read().split("\n")
                  if ln.strip() and len(ln) <= 160]
    rng.shuffle(c)
    return out + c[: n // 6]


def _numbers(rng, n):
    months = ["January", "Feb", "März", "avril", "12月", "Jul"]
    out = []
    for i in range(n):
        k = i % 12
        if k == 0:
            out.append(f"{rng.randint(1, 31):02d}/{rng.randint(1, 12):02d}/{rng.randint(1900, 2100)}")
        elif k == 1:
            out.append(f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                       f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z")
        elif k == 2:
            out.append(f"Total: ${rng.randint(0, 10**7):,}.{rng.randint(0, 99):02d} "
                       f"({rng.uniform(-100, 100):.3f}%)")
        elif k == 3:
            out.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(1, 8))))
        elif k == 4:
            out.append(f"{rng.uniform(-1e10, 1e10):.6e} + {rng.random():.17g}i")
        elif k == 5:
            out.append(f"v{rng.randint(0, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}-rc{rng.randint(1, 9)}")
        elif k == 6:
            out.append(f"0x{rng.getrandbits(64):016x} 0b{rng.getrandbits(12):b} 0o{rng.getrandbits(9):o}")
        elif k == 7:
            out.append(f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}")
        elif k == 8:
            out.append(f"{rng.randint(1, 28)} {rng.choice(months)} {rng.randint(1, 2999)}, "
                       f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(['am', 'PM', 'a.m.'])}")
        elif k == 9:
            out.append(f"{rng.randint(1, 999)}km/h × {rng.randint(1, 99)}½ ≈ {rng.randint(1, 10**6)}′")
        elif k == 10:
            out.append("".join(rng.choice("0123456789") for _ in range(rng.randint(10, 60))))
        else:
            out.append(f"١٢٣ ٤٥٦ {rng.randint(0, 999)} ⅓ Ⅻ ② ¹²³ 𝟘𝟙𝟚 ٣٫١٤")
    return out


def _whitespace(rng, n):
    ws = [" ", "  ", "   ", "    ", "\t", "\t\t", " \t", "\t ", "\u00a0", "\u3000",
          "\u2003", "\u200b", "\u0085", "\x0b", "\x0c", "        "]
    words = ["alpha", "beta", "x", "if", "{", "}", "=", "42", "日本", "é"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            parts.append(rng.choice(ws) * rng.randint(1, 3))
            if rng.random() < 0.7:
                parts.append(rng.choice(words))
        out.append("".join(parts))
    out += ["", " ", "  ", "\t", "\t\t\t", " " * 40, "a" + " " * 17 + "b", " leading", "trailing ",
            "   both   "]
    return out


def _crlf(rng, prose, code, n):
    out = []
    for i in range(n):
        src = prose if i % 2 else code
        s = rng.choice(src)
        if i % 3 == 0:
            mid = len(s) // 2
            s = s[:mid] + "\r" + s[mid:]  # lone CR; CRLF pairs form in blocks
        if i % 5 == 0:
            s = s + " \r"
        out.append(s + "\r")
    out += ["\r", "\r\r", " \r", "a\rb", "\r\r\r"]
    return out


def _locale_strings():
    """Month and day names (and other LC_TIME strings) from glibc's locale
    sources, written there as <Uxxxx> sequences."""
    out = []
    base = "/usr/share/i18n/locales"
    for loc in ("ar_SA", "ar_EG", "fa_IR", "he_IL", "hi_IN", "th_TH", "ru_RU", "el_GR",
                "ja_JP", "zh_CN", "ko_KR", "ta_IN", "bn_IN", "am_ET", "ka_GE", "hy_AM",
                "my_MM", "km_KH", "ur_PK", "vi_VN", "tr_TR", "uk_UA"):
        p = os.path.join(base, loc)
        if not os.path.exists(p):
            continue
        text = open(p, encoding="utf-8", errors="replace").read()
        for m in re.finditer(r"\"((?:<U[0-9A-Fa-f]{4,5}>)+)\"", text):
            s = "".join(chr(int(u, 16)) for u in re.findall(r"<U([0-9A-Fa-f]{4,5})>", m.group(1)))
            if any(ord(ch) > 0x7f for ch in s):
                out.append(s)
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def _cjk_lines():
    """Python's cjkencodings test texts, cut into sentences and short runs."""
    import test
    d = os.path.join(os.path.dirname(test.__file__), "cjkencodings")
    out = []
    for f in sorted(os.listdir(d)):
        if f.endswith("-utf8.txt"):
            for ln in open(os.path.join(d, f), encoding="utf-8").read().split("\n"):
                ln = ln.strip("\r")
                for part in re.split(r"(?<=[。！？.!?])", ln):
                    while part.strip():
                        out.append(part[:80])
                        part = part[80:]
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def _cjk_windows(rng, cjk, n):
    """Random runs of the CJK texts (with their punctuation and the odd
    Latin word), to have a few hundred lines from few sources."""
    text = "".join(s for s in cjk if any(ord(ch) > 0x2e80 for ch in s))
    out = []
    for _ in range(n):
        a = rng.randrange(len(text))
        out.append(text[a:a + rng.randint(4, 70)].strip() or text[:8])
    return out


def _scripts(rng, locale, n):
    """Arabic, Hebrew, Indic, Thai text assembled from locale strings, mixed
    with Latin and digits."""
    out = []
    for _ in range(n):
        parts = [rng.choice(locale) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.4:
            parts.insert(rng.randint(0, len(parts)), rng.choice(["ok", "2024", "(test)", "—", "!"]))
        out.append(" ".join(parts))
    return out


def _emoji(rng, n):
    single = ["😀", "👍", "🎉", "🔥", "❤️", "✨", "🚀", "🐍", "🦀", "🍕", "☕", "⚡", "🌍", "🤖", "🧪"]
    zwj = ["👨‍👩‍👧‍👦", "👩‍💻", "🏳️‍🌈", "🧑🏽‍🚀", "👨🏿‍🦰", "🫱🏻‍🫲🏿", "❤️‍🔥", "🐻‍❄️", "👁️‍🗨️"]
    mods = ["👋🏻", "👋🏼", "👋🏽", "👋🏾", "👋🏿"]
    flags = ["🇯🇵", "🇺🇸", "🇫🇷", "🇧🇷", "🇮🇳", "🏴󠁧󠁢󠁳󠁣󠁴󠁿"]
    keycap = ["1️⃣", "#️⃣", "*️⃣"]
    pools = single + zwj + mods + flags + keycap
    words = ["great job", "launch", "let's go", "pizza time", "hello", "nice", "ok"]
    out = []
    for i in range(n):
        k = rng.randint(1, 6)
        s = " ".join(rng.choice(words) if rng.random() < 0.4 else
                     "".join(rng.choice(pools) for _ in range(rng.randint(1, 3))) for _ in range(k))
        out.append(s)
    return out


def _combining(rng, n):
    import unicodedata
    marks = [chr(c) for c in range(0x300, 0x370)] + ["\u20dd", "\u0e31", "\u093f", "\u05b8", "\u0670"]
    bases = "aeiouAEIOUnszcgkxyq"
    out = []
    for i in range(n):
        w = []
        for _ in range(rng.randint(1, 6)):
            word = ""
            for _ in range(rng.randint(1, 6)):
                word += rng.choice(bases) + "".join(rng.choice(marks) for _ in range(rng.randint(0, 3)))
            w.append(word)
        s = " ".join(w)
        if i % 4 == 0:
            s = unicodedata.normalize("NFD", "Ça été déjà vu à Zürich, naïve façade, São Paulo, Ångström")
        elif i % 4 == 1:
            s = "Z̵̡̢͚̯͔̈́a̷̞̔l̴̟̈g̸̰̈́o̵̢̍ " + s
        out.append(s)
    out += ["한국어 텍스트 한글 자모", "Ꭰ Ꭱ Ꭲ Cherokee", "ﬁ ﬂ ﬀ ligatures", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ"]
    return out


def _invalid(rng, base, n):
    bad = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80",
           b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80",
           b"\xe2\x82", b"\xe2", b"\xf0\x9f\x98", b"\xf0\x9f", b"\xf4\x90\x80\x80",
           b"\xc3", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc",
           b"\x80\x80\x80", b"\xef\xbf\xbe", b"\xe0\xa0", b"\xf0\x90\x80"]
    out = []
    for i in range(n):
        s = bytearray(rng.choice(base).encode("utf-8"))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randint(0, len(s))
            s[pos:pos] = rng.choice(bad)
        out.append(bytes(s))
    out += [b"\xff", b"\xc3", b"\xe2\x82", b"ab\xe2\x82", b"\xe2\x82\xacok", b"\xff\xfe\xfd",
            b"truncated emoji \xf0\x9f\x98", b"<|im_start|>\xff<|im_end|>"]
    return out


def _special(rng, n):
    toks = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>",
            "<jupyter_code>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<start_of_turn>",
            "<end_of_turn>", "<unused0>", "<unused123>", "<unused6241>", "<table>", "</td>",
            "<b>", "</b>", "<start_of_image>", "[multimodal]", "<|eot_id|>",
            "<|begin_of_text|>", "<think>", "</think>", "<0x41>", "<s>", "</s>"]
    near = ["<|im_start", "im_end|>", "<|im_start|", "<<|im_end|>>", "<|endoftext|>>",
            "<end_of_turn", "<unused>", "<unused99999>", "< bos>", "<BOS>", "<|IM_START|>"]
    words = ["user", "assistant", "system", "\rHello", " world", "text", "  ", "\r", "\t", "42"]
    out = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(1, 7)):
            r = rng.random()
            parts.append(rng.choice(toks) if r < 0.5 else rng.choice(near) if r < 0.65 else rng.choice(words))
        out.append("".join(parts))
    return out


def make_corpus(out_path):
    rng = random.Random(20261122)
    prose = _prose_lines(rng, 1500)
    code = _code_lines(rng, 1500)
    locale = _locale_strings()
    cjk = _cjk_lines()
    sections = [
        ("prose", [s.encode() for s in prose]),
        ("code", [s.encode() for s in code]),
        ("numbers", [s.encode() for s in _numbers(rng, 400)]),
        ("whitespace", [s.encode() for s in _whitespace(rng, 250)]),
        ("crlf", [s.encode() for s in _crlf(rng, prose, code, 200)]),
        ("cjk", [s.encode() for s in cjk[:300] + _cjk_windows(rng, cjk, 240)]),
        ("scripts", [s.encode() for s in locale[:250] + _scripts(rng, locale, 250)]),
        ("emoji", [s.encode() for s in _emoji(rng, 250)]),
        ("combining", [s.encode() for s in _combining(rng, 200)]),
        ("invalid", _invalid(rng, prose + cjk + locale, 250)),
        ("special", [s.encode() for s in _special(rng, 300)]),
    ]
    lines = []
    for name, ls in sections:
        for ln in ls:
            assert b"\n" not in ln, (name, ln)
            assert b"\x00" not in ln, (name, ln)
        lines += ls
        print(f"corpus: {name}: {len(ls)} lines", file=sys.stderr)
    with open(out_path, "wb") as f:
        for ln in lines:
            f.write(ln + b"\n")
    print(f"corpus: {len(lines)} lines, {sum(len(l) + 1 for l in lines)} bytes -> {out_path}",
          file=sys.stderr)


def read_records(corpus):
    data = open(corpus, "rb").read()
    assert data.endswith(b"\n")
    lines = data[:-1].split(b"\n")
    recs = list(lines)
    for i in range(0, min(len(lines), N_BLOCKS * 8), 8):
        recs.append(b"\n".join(lines[i:i + 8]) + b"\n")
    return recs


# ---------------------------------------------------------------------------
# Reference tokenizers

def load_gguf_tokenizer(path):
    from transformers import AutoTokenizer
    d, f = os.path.split(os.path.abspath(path))
    return AutoTokenizer.from_pretrained(d, gguf_file=f)


def gguf_pre(path):
    import gguf
    r = gguf.GGUFReader(path)
    fld = r.fields.get("tokenizer.ggml.pre")
    return bytes(fld.parts[fld.data[0]]).decode() if fld else None


def set_split(tok, regex, ignore_merges=None):
    from tokenizers import Regex, pre_tokenizers
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    if ignore_merges is not None:
        tok.backend_tokenizer.model.ignore_merges = ignore_merges


def set_smollm(tok):
    from tokenizers import pre_tokenizers
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def encode_all(tok, texts, split_special=False):
    return [tok(t, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]
            for t in texts]


def write_ids(path, header, ids, index=None):
    with open(path, "w") as f:
        f.write(f"# {header}\n")
        for k, row in enumerate(ids):
            prefix = f"{index[k]}:" if index is not None else ""
            f.write(prefix + " ".join(map(str, row)) + "\n")


def make_ids(corpus, outdir):
    import tokenizers
    import transformers
    recs = read_records(corpus)
    texts = [r.decode("utf-8", "replace") for r in recs]
    lt = [i for i, t in enumerate(texts) if "<" in t]
    ver = f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}"
    print(f"ids: {len(recs)} records", file=sys.stderr)

    tok = load_gguf_tokenizer(SMOLLM2)
    assert gguf_pre(SMOLLM2) == "smollm"
    plain = encode_all(tok, texts)
    set_smollm(tok)
    ids = encode_all(tok, texts)
    diff = sum(a != b for a, b in zip(plain, ids))
    print(f"ids: smollm2: transformers' converter without the smollm fix differs on "
          f"{diff} of {len(recs)} records", file=sys.stderr)
    write_ids(os.path.join(outdir, "expected-smollm2.txt"), f"smollm2 {SMOLLM2}; {ver}", ids)
    write_ids(os.path.join(outdir, "expected-smollm2-nosplit.txt"),
              f"smollm2 split_special_tokens=True; {ver}",
              encode_all(tok, [texts[i] for i in lt], True), lt)

    set_split(tok, QWEN2_SPLIT)
    write_ids(os.path.join(outdir, "expected-smollm2-qwen2.txt"),
              f"smollm2 vocabulary, qwen2 split; {ver}", encode_all(tok, texts))
    set_split(tok, LLAMA3_SPLIT, ignore_merges=True)
    write_ids(os.path.join(outdir, "expected-smollm2-llama3.txt"),
              f"smollm2 vocabulary, llama3 split, ignore_merges; {ver}", encode_all(tok, texts))

    if os.path.exists(GEMMA3):
        tok = load_gguf_tokenizer(GEMMA3)
        write_ids(os.path.join(outdir, "expected-gemma3.txt"), f"gemma3 {GEMMA3}; {ver}",
                  encode_all(tok, texts))
        write_ids(os.path.join(outdir, "expected-gemma3-nosplit.txt"),
                  f"gemma3 split_special_tokens=True; {ver}",
                  encode_all(tok, [texts[i] for i in lt], True), lt)
        bos = tok("Hello")["input_ids"]
        print(f"ids: gemma3 with special tokens: {bos}", file=sys.stderr)
    else:
        print(f"ids: {GEMMA3} absent: no Gemma reference (scripts/fetch-gemma.sh)", file=sys.stderr)


# ---------------------------------------------------------------------------
# Chat goldens

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello! What is 2+2?"}],
    "system_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Tell me a joke about C."},
    ],
    "no_system_multi": [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "Second answer"},
    ],
    "whitespace": [
        {"role": "system", "content": "  spaced system \n"},
        {"role": "user", "content": "\n\n  padded question\t \n"},
        {"role": "assistant", "content": " answer with trailing newline\n"},
        {"role": "user", "content": "unicode: 日本語 🚀 é"},
    ],
    "specials_in_content": [
        {"role": "user", "content": "What does <|im_end|> or <end_of_turn> mean?"},
    ],
    "tool": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": "{\"temp_c\": 21}"},
        {"role": "tool", "content": "{\"sky\": \"clear\"}"},
        {"role": "user", "content": "Thanks"},
    ],
    "think_history": [
        {"role": "user", "content": "What is 3*7?"},
        {"role": "assistant", "content": "<think>\n3*7 is 21.\n</think>\n\n21"},
        {"role": "user", "content": "And 4*5?"},
    ],
    "think_last": [
        {"role": "user", "content": "What is 3*7?"},
        {"role": "assistant", "content": "<think>\nmultiply\n</think>\n\n21"},
    ],
    "empty_content": [
        {"role": "user", "content": ""},
    ],
}

TEMPLATES = {
    # name: (template file, family, tokenizer for bos/eos, conversations it accepts)
    "smollm2": ("smollm2.jinja", "chatml", None),
    "qwen2.5": ("qwen2.5.jinja", "qwen2", None),
    "qwen3": ("qwen3.jinja", "qwen3", None),
    "llama3": ("llama3.jinja", "llama3", None),
    "gemma3": ("gemma3.jinja", "gemma", None),
}

BOS = {"smollm2": "<|im_start|>", "qwen2.5": None, "qwen3": None,
       "llama3": "<|begin_of_text|>", "gemma3": "<bos>"}
EOS = {"smollm2": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
       "llama3": "<|eot_id|>", "gemma3": "<eos>"}


def make_chat(outdir):
    import jinja2  # noqa: F401  (transformers renders with it)
    from transformers.utils.chat_template_utils import render_jinja_template
    tdir = os.path.join(outdir, "templates")
    # SmolLM2's template is the GGUF's own.
    import gguf
    r = gguf.GGUFReader(SMOLLM2)
    fld = r.fields["tokenizer.chat_template"]
    with open(os.path.join(tdir, "smollm2.jinja"), "w") as f:
        f.write(bytes(fld.parts[fld.data[0]]).decode())
    cases = []
    for name, (fname, family, _) in TEMPLATES.items():
        tmpl = open(os.path.join(tdir, fname)).read()
        for conv_name, msgs in CONVERSATIONS.items():
            for gen in (False, True):
                thinks = (None, False, True) if name == "qwen3" and gen else (None,)
                for think in thinks:
                    kw = {"bos_token": BOS[name], "eos_token": EOS[name]}
                    if think is not None:
                        kw["enable_thinking"] = think
                    try:
                        rendered, _ = render_jinja_template(
                            conversations=[msgs], chat_template=tmpl,
                            add_generation_prompt=gen, **kw)
                        expected, error = rendered[0], None
                    except Exception as e:  # the template refuses these messages
                        expected, error = None, str(e)
                    cases.append({"template": fname, "family": family, "conversation": conv_name,
                                  "add_generation_prompt": gen,
                                  "enable_thinking": -1 if think is None else int(think),
                                  "messages": msgs, "expected": expected, "error": error})
    with open(os.path.join(outdir, "chat_golden.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"chat: {len(cases)} cases, {sum(c['error'] is not None for c in cases)} refused",
          file=sys.stderr)


# ---------------------------------------------------------------------------
# Small HF directories

def make_hf(corpus, outdir):
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors, trainers)
    recs = read_records(corpus)
    texts = [r.decode("utf-8", "replace") for r in recs]
    train = texts[:3000]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

    def byte_level(pre, ignore_merges=False):
        tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                 show_progress=False)
        tok.train_from_iterator(train, tr)
        return tok

    def split(regex):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=False)])

    def sentencepiece(gemma):
        # Train on ▁-words, then rebuild as the SentencePiece-style BPE that
        # transformers writes: byte tokens, byte_fallback, specials first.
        tmp = Tokenizer(models.BPE())
        tmp.normalizer = normalizers.Replace(" ", "\u2581")
        tmp.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
        tr = trainers.BpeTrainer(vocab_size=900, show_progress=False, limit_alphabet=200)
        tmp.train_from_iterator(train, tr)
        data = json.loads(tmp.to_str())
        head = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
        vocab = {t: i for i, t in enumerate(head)}
        for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]):
            vocab.setdefault(t, len(vocab))
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                  for m in data["model"]["merges"]]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                   fuse_unk=True, byte_fallback=True))
        if gemma:
            tok.normalizer = normalizers.Replace(" ", "\u2581")
            tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                             decoders.ByteFallback(), decoders.Fuse()])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                             decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(content=" ", left=1)])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<pad>", "<eos>", "<bos>", "<unk>")])
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
        return tok

    qwen_nfc = byte_level(split(QWEN2_SPLIT))
    qwen_nfc.normalizer = normalizers.NFC()
    dirs = {
        "hf-bytelevel": (byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False)),
                         {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
        "hf-smollm": (byte_level(pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])),
            {"eos_token": "<|endoftext|>"}),
        "hf-qwen2": (qwen_nfc, {"eos_token": "<|im_end|>"}),
        "hf-llama3": (byte_level(split(LLAMA3_SPLIT), ignore_merges=True),
                      {"eos_token": {"content": "<|endoftext|>"}}),
        "hf-gemma": (sentencepiece(True), {"bos_token": "<bos>", "eos_token": "<eos>"}),
        "hf-llama2": (sentencepiece(False), {"bos_token": "<bos>", "eos_token": "<eos>"}),
    }
    pick = list(range(0, len(recs), 10))
    for name, (tok, cfg) in dirs.items():
        d = os.path.join(outdir, name)
        os.makedirs(d, exist_ok=True)
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f)
        ids = [tok.encode(texts[i], add_special_tokens=True).ids for i in pick]
        write_ids(os.path.join(d, "expected.txt"),
                  f"{name}: every 10th record, add_special_tokens=True", ids, pick)
        print(f"hf: {name}: {tok.get_vocab_size()} tokens", file=sys.stderr)


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "corpus":
        make_corpus(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "ids":
        make_ids(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == "hf":
        make_hf(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 3 and sys.argv[1] == "chat":
        make_chat(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
