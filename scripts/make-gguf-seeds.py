#!/usr/bin/env python3
"""make-gguf-seeds.py [OUT_DIR] - write the seed corpus of fuzz_gguf (default
tests/fuzz/corpus/gguf).

valid-*.gguf are written by gguf-py's GGUFWriter (the reference writer, so
the seeds also check that kiln reads what llama.cpp's tools write): every
metadata type, string and nested arrays, a small vocabulary, tensors of
plain, quantized and IQ types, default and custom alignment, version 3 and
(patched) version 2.  bad-*.gguf are packed by hand, one per kind of fault
the reader checks.  test_gguf opens every file here and expects valid-* to
parse and bad-* to be refused.  Run with the venv that setup makes:

    .venv/bin/python scripts/make-gguf-seeds.py

The output is deterministic, so re-running changes nothing."""
import os
import struct
import sys

import numpy as np
from gguf import GGUFValueType as VT, GGUFWriter, GGMLQuantizationType as QT

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fuzz/corpus/gguf"


def pattern(n, seed):
    return np.array([(i * 31 + seed * 17 + 5) & 0xFF for i in range(n)],
                    dtype=np.uint8)


def write_valid(name, version=3, alignment=None, vocab=40, tensors=True):
    path = os.path.join(OUT, name)
    w = GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("seed")
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.embedding_length", 32)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float64("test.f64", -2.5)
    w.add_bool("test.bool", True)
    w.add_uint8("test.u8", 7)
    w.add_int8("test.i8", -7)
    w.add_uint16("test.u16", 700)
    w.add_int16("test.i16", -700)
    w.add_int32("test.i32", -70000)
    w.add_uint64("test.u64", 1 << 40)
    w.add_int64("test.i64", -(1 << 40))
    w.add_string("tokenizer.ggml.model", "gpt2")
    toks = ["<s>", "</s>", ""] + ["t%d" % i for i in range(vocab - 3)]
    w.add_array("tokenizer.ggml.tokens", toks)
    w.add_array("tokenizer.ggml.scores", [float(-i) for i in range(vocab)])
    w.add_key_value("tokenizer.ggml.token_type", [1] * vocab, VT.ARRAY,
                    sub_type=VT.INT32)
    w.add_array("tokenizer.ggml.merges", ["t 1", "t1 2"])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_array("test.nested3", [[["a", "b"]], [["c"]]])
    w.add_array("test.bools", [True, False])
    if tensors:
        w.add_tensor("token_embd.weight",
                     np.arange(32 * 4, dtype=np.float32).reshape(4, 32))
        w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float16))
        # quantized rows are given as raw bytes: (rows, bytes per row)
        w.add_tensor("blk.0.attn_q.weight", pattern(2 * 18, 1).reshape(2, 18),
                     raw_dtype=QT.Q4_0)
        w.add_tensor("blk.0.ffn_up.weight", pattern(144, 2).reshape(1, 144),
                     raw_dtype=QT.Q4_K)
        w.add_tensor("blk.0.ffn_down.weight", pattern(66, 3).reshape(1, 66),
                     raw_dtype=QT.IQ2_XXS)
        w.add_tensor("test.i8", np.arange(5, dtype=np.int8).reshape(1, 1, 1, 5))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", version))


# --- hand-packed broken files ---------------------------------------------

def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def ti(name, ne, ttype, offset):
    return (s(name) + struct.pack("<I", len(ne)) +
            b"".join(struct.pack("<Q", d) for d in ne) +
            struct.pack("<IQ", ttype, offset))


def gguf(kvs, tis, data=b"", version=3, magic=b"GGUF", n_kv=None,
         n_tensors=None, align=32):
    head = magic + struct.pack("<IQQ", version,
                               len(tis) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tis)
    body += b"\0" * (-len(body) % align)
    return body + data


ARCH = kv("general.architecture", VT.STRING, s("llama"))
U32 = lambda v: struct.pack("<I", v)
F32_4x2 = ti("w", [4, 2], QT.F32, 0)
DATA32 = bytes(range(32))

BAD = {
    "magic": gguf([ARCH], [], magic=b"GGML"),
    "big-endian": gguf([ARCH], [], version=0x03000000),
    "version-1": gguf([ARCH], [], version=1),
    "n-kv": gguf([ARCH], [], n_kv=1 << 40),
    "n-tensors": gguf([ARCH], [], n_tensors=1000),
    "string-len": gguf([kv("general.architecture", VT.STRING,
                           struct.pack("<Q", 1 << 30) + b"llama")], []),
    "array-len": gguf([kv("a", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 1 << 30))], []),
    "array-depth": gguf([kv("a", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) * 5 +
                            struct.pack("<IQ", VT.UINT8, 0))], []),
    "value-type": gguf([kv("a", 13, b"\0" * 8)], []),
    "bool": gguf([kv("a", VT.BOOL, b"\x05")], []),
    "dup-key": gguf([ARCH, ARCH], []),
    "alignment": gguf([ARCH, kv("general.alignment", VT.UINT32, U32(48))], []),
    "n-dims": gguf([ARCH], [ti("w", [1, 1, 1, 1, 1], QT.F32, 0)], DATA32),
    "tensor-type": gguf([ARCH], [ti("w", [8], 5, 0)], DATA32),
    "block": gguf([ARCH], [ti("w", [30], QT.Q4_0, 0)], DATA32),
    "dim-overflow": gguf([ARCH], [ti("w", [1 << 32, 1 << 32], QT.F32, 0)], DATA32),
    "misaligned": gguf([ARCH], [ti("w", [4], QT.F32, 4)], DATA32),
    "out-of-bounds": gguf([ARCH], [ti("w", [64], QT.F32, 0)], DATA32),
    "overlap": gguf([ARCH], [F32_4x2, ti("v", [2], QT.F32, 0)], DATA32),
    "dup-tensor": gguf([ARCH], [F32_4x2, ti("w", [2], QT.F32, 32)], DATA32 * 2),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    write_valid("valid-v3.gguf")
    write_valid("valid-v2.gguf", version=2)
    write_valid("valid-align64.gguf", alignment=64, vocab=8)
    write_valid("valid-align1.gguf", alignment=1, vocab=4)
    write_valid("valid-no-tensors.gguf", tensors=False, vocab=4)
    for name, blob in BAD.items():
        with open(os.path.join(OUT, "bad-%s.gguf" % name), "wb") as f:
            f.write(blob)
    # a valid file cut inside its tensor infos
    with open(os.path.join(OUT, "valid-v3.gguf"), "rb") as f:
        whole = f.read()
    with open(os.path.join(OUT, "bad-truncated.gguf"), "wb") as f:
        f.write(whole[: len(whole) * 2 // 3])


if __name__ == "__main__":
    main()
