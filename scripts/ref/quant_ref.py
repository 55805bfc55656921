#!/usr/bin/env python3
"""quant_ref.py - reference dequantizations for kiln's quant tests.

For every block format kiln computes on, makes FRESH random blocks (a new
seed each run, printed; set QUANT_REF_SEED to repeat one), dequantizes them
with gguf-py's numpy code (gguf.quants.dequantize) and writes OUTDIR/
quant_<TYPE>.bin, which tests/test_quant.c reads and compares bitwise with
kiln's dequantize:

  header  char[4] "KQRF", u32 version (1), u32 type id, u32 block_size,
          u32 type_size, u32 n_blocks, u64 seed            (32 bytes, LE)
  blocks  n_blocks * type_size bytes
  ref     n_blocks * block_size float32

Quant bytes are uniformly random, so every bit pattern of the quants and
sub-block scales occurs; the half scale fields (d, m, dmin, s) are replaced
by finite random values of magnitude 2^-16 .. 2^4 (half subnormals
included), as is Q8_K's float d.  Float formats get random bit patterns,
but no NaN halves: numpy may quiet a signalling NaN with F16C, and
which NaN comes out is no part of the contract.

gguf-py has no dequantizer for the activation formats Q8_1 and Q8_K, so
those references are computed here with the same numpy float32 arithmetic
(d * q).  Usage: quant_ref.py OUTDIR   (run by `make refdata`)
"""
import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

VERSION = 1

# name -> (type id, block_size, type_size, half-field offsets, float-field
# offsets).  Sizes are GGML's current layouts (gguf-py's constants still
# list the old 40-byte Q8_1; kiln uses the 36-byte one with half d and s).
FORMATS = {
    "F32": (0, 1, 4, [], []),
    "F16": (1, 1, 2, [], []),
    "BF16": (30, 1, 2, [], []),
    "Q4_0": (2, 32, 18, [0], []),
    "Q4_1": (3, 32, 20, [0, 2], []),
    "Q5_0": (6, 32, 22, [0], []),
    "Q5_1": (7, 32, 24, [0, 2], []),
    "Q8_0": (8, 32, 34, [0], []),
    "Q8_1": (9, 32, 36, [0, 2], []),
    "Q2_K": (10, 256, 84, [80, 82], []),
    "Q3_K": (11, 256, 110, [108], []),
    "Q4_K": (12, 256, 144, [0, 2], []),
    "Q5_K": (13, 256, 176, [0, 2], []),
    "Q6_K": (14, 256, 210, [208], []),
    "Q8_K": (15, 256, 292, [], [0]),
}

N_ELEMS_FLOAT = 4096  # elements for the float formats
N_BLOCKS_QUANT = 64   # blocks for the quantized formats


def random_scales(rng, n, dtype):
    """n finite values of random sign and magnitude 2^-16 .. 2^4."""
    mag = np.exp2(rng.uniform(-16.0, 4.0, size=n))
    sign = np.where(rng.integers(0, 2, size=n) == 1, -1.0, 1.0)
    return (sign * mag).astype(dtype)


def make_blocks(rng, name):
    tid, bs, ts, half_offs, f32_offs = FORMATS[name]
    nb = N_ELEMS_FLOAT if bs == 1 else N_BLOCKS_QUANT
    raw = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    for off in half_offs:
        raw[:, off:off + 2] = random_scales(rng, nb, np.float16).view(np.uint8).reshape(nb, 2)
    for off in f32_offs:
        raw[:, off:off + 4] = random_scales(rng, nb, np.float32).view(np.uint8).reshape(nb, 4)
    if name == "F16":
        h = raw.reshape(-1).view(np.uint16)
        nan = ((h & 0x7C00) == 0x7C00) & ((h & 0x03FF) != 0)
        h[nan] &= np.uint16(0xFC00)  # NaN -> infinity of the same sign
    return nb, raw


def dequantize(name, raw):
    nb = raw.shape[0]
    if name == "Q8_1":
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
        q = raw[:, 4:].copy().view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    if name == "Q8_K":
        d = raw[:, 0:4].copy().view(np.float32)
        q = raw[:, 4:260].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)
    qtype = T[name]
    out = quants.dequantize(raw.reshape(-1), qtype) if FORMATS[name][1] == 1 \
        else quants.dequantize(raw.reshape(1, -1), qtype)
    out = np.asarray(out, dtype=np.float32).reshape(-1)
    assert out.size == nb * FORMATS[name][1], name
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: quant_ref.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    seed = int(os.environ.get("QUANT_REF_SEED", "0")) or \
        int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    print(f"quant_ref.py: seed {seed} (QUANT_REF_SEED={seed} repeats it)")
    rng = np.random.default_rng(seed)
    for name, (tid, bs, ts, _, _) in FORMATS.items():
        nb, raw = make_blocks(rng, name)
        ref = dequantize(name, raw)
        path = os.path.join(outdir, f"quant_{name}.bin")
        with open(path, "wb") as f:
            f.write(struct.pack("<4s5IQ", b"KQRF", VERSION, tid, bs, ts, nb, seed))
            f.write(raw.tobytes())
            f.write(ref.astype("<f4").tobytes())
    print(f"quant_ref.py: wrote {len(FORMATS)} files to {outdir}")


if __name__ == "__main__":
    main()
