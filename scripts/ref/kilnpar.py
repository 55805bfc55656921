"""kilnpar.py - kiln's logit parity fixture format "KILNPAR1", written by the
reference scripts (logits_ref_hf.py, make_tiny_hf.py, hf_logits.py) and read
by tests/parity.h.  All little-endian:

    "KILNPAR1"
    u32 n_prompts, n_vocab, top_k, n_cont
    per prompt:
        u32 n_prompt
        i32 tokens[n_prompt + n_cont]      the prompt, then the reference's
                                           greedy continuation
        per position of those tokens:
            f32 lse                        log-sum-exp of the whole logit row
            i32 ids[top_k]                 the top_k tokens, best first (ties
                                           by lower id)
            f32 logits[top_k]              their logits
"""
import struct

import numpy as np

MAGIC = b"KILNPAR1"


def write_header(f, n_prompts, n_vocab, top_k, n_cont):
    f.write(MAGIC)
    f.write(struct.pack("<4I", n_prompts, n_vocab, top_k, n_cont))


def write_row(f, row, top_k):
    """One position: row is that position's logits over the whole vocabulary
    (numpy float32 or float64; the log-sum-exp is taken in float64)."""
    top = np.argsort(-row, kind="stable")[:top_k]
    m = float(np.max(row))
    lse = m + float(np.log(np.sum(np.exp(row.astype(np.float64) - m))))
    f.write(struct.pack("<f", lse))
    f.write(top.astype("<i4").tobytes())
    f.write(row[top].astype("<f4").tobytes())


def write_prompt(f, n_prompt, seq, logits, top_k):
    """seq: prompt + continuation token ids; logits: (len(seq), n_vocab)."""
    assert len(logits) == len(seq)
    f.write(struct.pack("<I", n_prompt))
    f.write(np.array(seq, dtype="<i4").tobytes())
    for row in logits:
        write_row(f, row, top_k)


def read(path):
    """(header dict, [(n_prompt, tokens, lse, ids, logits)]) of a fixture."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == MAGIC, f"{path}: not a KILNPAR1 file"
    n_prompts, n_vocab, top_k, n_cont = struct.unpack_from("<4I", data, 8)
    off, prompts = 24, []
    rec = np.dtype([("lse", "<f4"), ("ids", "<i4", top_k), ("logits", "<f4", top_k)])
    for _ in range(n_prompts):
        (n_prompt,) = struct.unpack_from("<I", data, off)
        n = n_prompt + n_cont
        tokens = np.frombuffer(data, "<i4", n, off + 4)
        off += 4 + 4 * n
        rows = np.frombuffer(data, rec, n, off)
        off += rec.itemsize * n
        prompts.append((n_prompt, tokens, rows["lse"], rows["ids"], rows["logits"]))
    assert off == len(data), f"{path}: {len(data) - off} trailing bytes"
    return dict(n_prompts=n_prompts, n_vocab=n_vocab, top_k=top_k, n_cont=n_cont), prompts
