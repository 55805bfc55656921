#!/usr/bin/env python3
"""make-safetensors-seeds.py [OUT_DIR] - write the seed corpus of
fuzz_safetensors (default tests/fuzz/corpus/safetensors): a few small valid
files laid out as the safetensors library writes them (header JSON padded
with spaces to a multiple of 8, tensors packed in order) and one broken file
per kind of fault the reader checks.  Plain python3, no numpy; the output is
deterministic, so re-running changes nothing."""
import json
import os
import struct
import sys

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I8": 1, "U8": 1,
         "I32": 4, "I64": 8, "F64": 8, "BOOL": 1}


def pattern(n, seed):
    return bytes((i * 31 + seed * 17 + 5) & 0xFF for i in range(n))


def build(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape); returns the file bytes."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for k, (name, dtype, shape) in enumerate(tensors):
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + n]}
        data += pattern(n, k)
    return raw(json.dumps(header, separators=(",", ":")), data, pad)


def raw(header_text, data=b"", pad=True, hlen=None):
    h = header_text.encode("utf-8")
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


def seeds():
    llama = [("model.embed_tokens.weight", "BF16", [16, 8])]
    for layer in range(2):
        p = "model.layers.%d." % layer
        llama += [(p + "input_layernorm.weight", "F32", [8]),
                  (p + "self_attn.q_proj.weight", "BF16", [8, 8]),
                  (p + "self_attn.k_proj.weight", "BF16", [4, 8]),
                  (p + "mlp.down_proj.weight", "F16", [8, 12])]
    llama += [("model.norm.weight", "F32", [8]), ("lm_head.weight", "BF16", [16, 8])]
    yield "valid_llama_like", build(llama, {"format": "pt"})
    yield "valid_f32", build([("w", "F32", [2, 3])])
    yield "valid_all_dtypes", build(
        [("f32", "F32", []), ("f16", "F16", [3]), ("bf16", "BF16", [2, 2]),
         ("f8", "F8_E4M3", [1, 2, 3]), ("i8", "I8", [2, 1, 2, 1]),
         ("u8", "U8", [5]), ("i32", "I32", [2]), ("i64", "I64", [1])],
        {"format": "pt", "note": "every dtype kiln accepts"})
    yield "valid_empty", build([], {})
    yield "valid_zero_size", build([("a", "F32", [0, 4]), ("b", "I64", [3, 0]),
                                    ("c", "U8", [2])])
    yield "valid_unpadded", build([("x", "I32", [3])], pad=False)

    ok = '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    yield "bad_truncated_data", build([("w", "F32", [4, 4])])[:-5]
    yield "bad_header_past_end", raw(ok, pattern(8, 0), hlen=4096)
    yield "bad_header_huge", raw(ok, pattern(8, 0), hlen=1 << 40)
    yield "bad_lfs_pointer", (b"version https://git-lfs.github.com/spec/v1\n"
                              b"oid sha256:00\nsize 8\n")
    yield "bad_overlap", raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                             '"b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}',
                             pattern(10, 1))
    yield "bad_dtype_f64", build([("w", "F64", [2])])
    yield "bad_rank5", build([("w", "U8", [1, 1, 2, 1, 1])])
    yield "bad_dup_key", raw(ok[:-1] + "," + ok[1:], pattern(8, 0))
    yield "bad_metadata", raw('{"__metadata__":{"k":1},' + ok[1:], pattern(8, 0))
    yield "bad_size_mismatch", raw(ok.replace("[0,8]", "[0,6]"), pattern(8, 0))
    yield "bad_negative_dim", raw(ok.replace("[2]", "[-2]"), pattern(8, 0))
    yield "bad_overflow", raw(ok.replace("[2]", "[4294967296,4294967296]"),
                              pattern(8, 0))
    yield "bad_not_object", raw("[" + ok + "]", pattern(8, 0))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fuzz/corpus/safetensors"
    os.makedirs(out, exist_ok=True)
    for name, blob in seeds():
        with open(os.path.join(out, name + ".safetensors"), "wb") as f:
            f.write(blob)


if __name__ == "__main__":
    main()
