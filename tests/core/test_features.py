"""Byte-class features and the request category."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from extproc.core.features import (CATEGORIES, CJK, CODE, FEATURE_NAMES, JSON, N_FEATURES, PROSE, features,
                              text_vector)

CALIB = "/work/shared/data/calib/calib_samples.jsonl.gz"


def feat(text: str, n_messages: int = 1, has_tools: bool = False):
    return features(text.encode("utf-8"), len(text), n_messages, has_tools)


def vec(text: str) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, feat(text).vector))


def test_vector_counts_exact():
    v = vec("Hello World 42!\n    x = {1};")
    assert v == {
        "letters": 11.0, "upper": 2.0, "digits": 3.0, "spaces": 8.0, "newlines": 1.0, "indents": 1.0,
        "punct": 5.0, "kana": 0.0, "han": 0.0, "other_nonascii": 0.0, "messages": 1.0, "bias": 1.0,
    }


def test_vector_non_ascii_classes():
    # 2 han, 3 kana (hiragana + katakana + CJK full stop), 2 other (é, emoji)
    v = vec("漢字ひカ。é😀a")
    assert v["han"] == 2 and v["kana"] == 3 and v["other_nonascii"] == 2
    assert v["letters"] == 1 and v["punct"] == 0
    f = feat("漢字ひカ。é😀a")
    assert f.n_bytes == len("漢字ひカ。é😀a".encode())


def test_messages_and_bias_terms():
    f = features(b"abc", 3, 7, False)
    assert len(f.vector) == N_FEATURES == len(FEATURE_NAMES)
    assert f.vector[FEATURE_NAMES.index("messages")] == 7.0
    assert f.vector[FEATURE_NAMES.index("bias")] == 1.0


def test_empty_text():
    f = features(b"", 0, 1, False)
    assert f.n_bytes == 0
    assert f.category == PROSE
    assert sum(f.vector[:10]) == 0


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_vector_partitions_characters(text):
    data = text.encode("utf-8", "surrogatepass")
    v, counts = text_vector(data, len(text))
    d = dict(zip(FEATURE_NAMES, v))
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    assert d["letters"] + d["digits"] + d["spaces"] + d["newlines"] + d["punct"] == ascii_chars
    assert d["kana"] + d["han"] + d["other_nonascii"] == len(text) - ascii_chars
    assert d["han"] == sum(1 for c in text if 0x4000 <= ord(c) <= 0x9FFF)
    assert d["kana"] == sum(1 for c in text if 0x3000 <= ord(c) <= 0x3FFF)
    assert all(x >= 0 for x in v)
    assert counts["cjk"] == d["kana"] + d["han"]
    f = features(data, len(text), 1, False)
    assert f.category in CATEGORIES


PROSE_TEXT = ("The Roman Empire was one of the largest empires of the ancient world. At its height it "
              "covered much of Europe, North Africa and the Middle East, and its legacy shaped law, "
              "language and architecture for centuries. Historians still debate why it declined.")
CODE_TEXT = '''def fib(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Cache:
    def __init__(self, size=128):
        self.data = {}
        self.size = size
'''
JS_TEXT = "function add(a, b) { return a + b; }\nconst xs = [1, 2, 3].map((x) => add(x, 1));\nif (xs.length > 2) { console.log(xs); }\n"
ZH_TEXT = "长城是中国古代的军事防御工程，修建于春秋战国时期，历经多个朝代的修缮和扩建。它是世界上最伟大的建筑之一。"
JA_TEXT = "日本の首都は東京です。東京には多くの観光地があり、毎年たくさんの人々が訪れます。"
JSON_TEXT = json.dumps({"name": "get_weather", "description": "Get weather",
                        "parameters": {"type": "object", "properties": {
                            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                            "required": ["city"]}}, indent=2)
JSON_COMPACT = json.dumps([{"id": i, "ok": True, "tags": ["a", "b"], "v": {"x": i * 2}} for i in range(10)])


@pytest.mark.parametrize("text, category", [
    (PROSE_TEXT, PROSE),
    (CODE_TEXT, CODE),
    (JS_TEXT, CODE),
    (ZH_TEXT, CJK),
    (JA_TEXT, CJK),
    (JSON_TEXT, JSON),
    (JSON_COMPACT, JSON),
    # Chinese with a few English words and digits is still CJK
    ("请解释一下 Python 的 GIL 是什么，以及它在 3.12 版本中的变化。", CJK),
    # English prose with a couple of parentheses stays prose
    ("I went to the store (the big one) and bought apples, pears and bread for the week.", PROSE),
])
def test_category_examples(text, category):
    assert feat(text).category == category


def test_tools_make_json_unless_cjk():
    assert feat(PROSE_TEXT, has_tools=True).category == JSON
    assert feat(CODE_TEXT, has_tools=True).category == JSON
    assert feat(ZH_TEXT, has_tools=True).category == CJK


def _calib():
    if not os.path.exists(CALIB):
        pytest.skip(f"calib data {CALIB} absent (see ../shared/data/README.md)")
    with gzip.open(CALIB) as f:
        return [json.loads(line) for line in f]


def test_calib_categories_agree_with_labels():
    by_subset: dict[str, Counter] = {}
    for r in _calib():
        f = features(r["text"].encode(), len(r["text"]), 1, False)
        by_subset.setdefault(r["category"] + "|" + r["subset"].split(" ")[0], Counter())[f.category] += 1

    def share(prefix, cat):
        c = Counter()
        for k, v in by_subset.items():
            if k.startswith(prefix):
                c.update(v)
        return c[cat] / sum(c.values())

    assert share("en|", PROSE) >= 0.97
    assert share("zh|", CJK) >= 0.95
    assert share("ja|", CJK) >= 0.9
    assert share("code|code_python", CODE) >= 0.9
    assert share("json|", JSON) >= 0.75


# --- the histogram against a pass per class ------------------------------------
# The features were once one bytes.count / bytes.translate pass per class; the
# byte histogram that replaced them (issue 19) must give the same vector and
# category for every text. This is that earlier code, kept as the reference.

def _reference(data: bytes, n_chars: int, n_messages: int, has_tools: bool):
    upper_b = bytes(range(0x41, 0x5B))
    letters_b = upper_b + bytes(range(0x61, 0x7B))
    nb = len(data)
    ascii_n = nb if nb == n_chars else len(data.translate(None, bytes(range(0x80, 0x100))))
    letters = nb - len(data.translate(None, letters_b))
    upper = nb - len(data.translate(None, upper_b)) if letters else 0
    digits = nb - len(data.translate(None, b"0123456789"))
    spaces, newlines = data.count(b" "), data.count(b"\n")
    indents = data.count(b"    ") if spaces else 0
    punct = max(0, ascii_n - letters - digits - spaces - newlines)
    nonascii = n_chars - ascii_n
    kana = data.count(b"\xe3") if nonascii else 0
    han = nb - len(data.translate(None, bytes(range(0xE4, 0xEA)))) if nonascii else 0
    other = max(0, nonascii - kana - han) if nonascii else 0
    vec = (letters, upper, digits, spaces, newlines, indents, punct, kana, han, other, n_messages, 1)
    n = nb or 1
    if (kana + han) / (n_chars or 1) >= 0.20:
        cat = CJK
    elif has_tools:
        cat = JSON
    elif punct / n >= 0.12 and (data.count(b'"') + data.count(b":") + data.count(b"{")) / n >= 0.12:
        cat = JSON
    elif (sum(data.count(c) for c in (b"{", b"(", b";", b"=", b"[", b"<")) + 2 * indents) / n >= 0.04:
        cat = CODE
    else:
        cat = PROSE
    return tuple(float(x) for x in vec), cat


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(' \n{}()[];=<>":,.abcXYZ019é漢ひ😀\t')) | st.characters()),
       st.integers(1, 5), st.booleans())
def test_histogram_features_match_the_per_class_passes(text, n_messages, has_tools):
    data = text.encode("utf-8", "surrogatepass")
    f = features(data, len(text), n_messages, has_tools)
    assert (f.vector, f.category) == _reference(data, len(text), n_messages, has_tools)


def test_histogram_features_match_on_real_prompts():
    if not os.path.exists(CALIB):
        pytest.skip("no calib data")
    with gzip.open(CALIB, "rt") as fh:
        for n, line in enumerate(fh):
            if n % 10:  # every tenth: all the subsets (prose, code, zh, ja, json, ...)
                continue
            text = json.loads(line)["text"]
            data = text.encode("utf-8", "surrogatepass")
            f = features(data, len(text), 1, False)
            assert (f.vector, f.category) == _reference(data, len(text), 1, False)
