# kiln - build, test and set-up.
#
#   make              build/kiln, build/libkiln.a, build/libkiln.so, build/kiln.pc,
#                     and with CUDA build/libkiln-cuda.so (the CUDA backend,
#                     loaded by libkiln on the first request for a GPU)
#   make setup        install system packages and fetch the default model
#   make run          set up, build, and run kiln's main job on the default model
#   make check        set up, build, run every test (release + ASan/UBSan) and
#                     a short fuzz smoke run; what CI runs
#   make test         the unit tests of the release build only
#   make test-asan    the unit tests built with ASan + UBSan (build/asan)
#   make fuzz-smoke   each fuzz target for FUZZ_SMOKE_SECS seconds
#   make fuzz         each fuzz target for FUZZ_SECS seconds
#   make test-gpu     the GPU tests (tests/gpu), on a machine with a CUDA GPU;
#                     CI builds them (CUDA=1) without running them
#   make CUDA=0       build without the CUDA backend even when nvcc is found
#   make DEBUG=1      -O0, file:line in error messages

BUILD     ?= build
CC        ?= cc
ifeq ($(CC),cc)
CC        := gcc
endif
PYTHON    ?= python3
VENV      ?= .venv
# the interpreter of the server's client tests (openai, Chromium driver)
export KILN_TEST_PYTHON ?= $(VENV)/bin/python
ARCH      ?= -march=native
DEBUG     ?= 0
SANITIZE  ?= 0

NVCC      ?= $(shell command -v nvcc 2>/dev/null || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
ifeq ($(origin CUDA),undefined)
CUDA      := $(if $(NVCC),1,0)
endif
CUDA_ARCH ?= -gencode arch=compute_90a,code=sm_90a

WARN      := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wno-unused-parameter
CSTD      := -std=c11 -D_GNU_SOURCE
OPT       := $(if $(filter 1,$(DEBUG)),-O0 -DKILN_DEBUG,-O2)
SAN_ON    := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -DKILN_DEBUG
SANFLAGS  := $(if $(filter 1,$(SANITIZE)),$(SAN_ON))
CFLAGS    ?=
CFLAGS    += $(CSTD) $(OPT) -g $(ARCH) -fPIC -fvisibility=hidden -fopenmp $(WARN) $(SANFLAGS) -Iinclude -Isrc -MMD -MP
LDLIBS    := -ljansson -lpcre2-8 -lutf8proc -lxxhash -lm -lpthread -ldl
# what kiln serve (HTTP) and kiln eval (its --endpoint client) add
APP_LDLIBS := -lmicrohttpd -lcurl
LDFLAGS   += -fopenmp $(SANFLAGS)

# MPI (OpenMPI, from scripts/setup.sh): CPU ranks of tensor parallelism and
# ranks started by mpirun (src/dist).  Its headers are found through
# pkg-config; libmpi itself is opened on first use (src/dist/comm_mpi.c), so
# nothing links it.  MPI=0 builds without it, and kiln then refuses CPU
# tensor parallelism.
ifeq ($(origin MPI),undefined)
MPI       := $(if $(shell pkg-config --exists ompi-c 2>/dev/null && echo 1),1,0)
endif
ifeq ($(MPI),1)
CFLAGS    += -DKILN_HAVE_MPI $(shell pkg-config --cflags ompi-c)
endif

# The CUDA backend is a shared object of its own (src/backend/plugin.h):
# libkiln links none of the CUDA libraries and loads it on the first request
# for a CUDA device.  It carries copies of the pure helpers it calls.
ifeq ($(CUDA),1)
CFLAGS    += -DKILN_HAVE_CUDA -DKILN_CUDA_PLUGIN_DIR='"$(abspath $(BUILD))"'
NVCCFLAGS ?= -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-fvisibility=hidden,-Wall,-Werror -Iinclude -Isrc \
             -DKCU_NCCL_FALLBACK='"$(CUDA_HOME)/lib64/libnccl.so.2"'
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublas -lcublasLt -lstdc++
CU_SRC    := $(sort $(shell find src -name '*.cu'))
CUDA_PLUGIN := $(BUILD)/libkiln-cuda.so
endif

# server/ and eval/ are applications on kiln.h (and util/), not part of the
# library: their own archive, held to the same contract as the CLI.
APP_DIRS  := src/server src/eval
APP_SRC   := $(sort $(shell find $(APP_DIRS) -name '*.c'))
LIB_SRC   := $(filter-out $(APP_SRC),$(sort $(shell find src -name '*.c')))
CLI_SRC   := $(sort $(wildcard cli/*.c))
TEST_SRC  := $(sort $(wildcard tests/test_*.c))
EX_SRC    := $(sort $(wildcard examples/*.c))
FUZZ_SRC  := $(sort $(wildcard tests/fuzz/fuzz_*.c))

LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
APP_OBJ   := $(APP_SRC:%.c=$(BUILD)/obj/%.o)
APP_LIB   := $(BUILD)/libkiln-apps.a
CU_OBJ    := $(CU_SRC:%.cu=$(BUILD)/obj/%.o)
CU_HELPERS := $(BUILD)/obj/src/util/misc.o
CLI_OBJ   := $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
TESTS     := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
GPU_TEST_SRC := $(sort $(wildcard tests/gpu/test_*.c))
GPU_BENCH_SRC := $(sort $(wildcard bench/gpu/*.c))
GPU_BENCH := $(if $(filter 1,$(CUDA)),$(GPU_BENCH_SRC:bench/gpu/%.c=$(BUILD)/bench/%))
GPU_TESTS := $(if $(filter 1,$(CUDA)),$(GPU_TEST_SRC:tests/gpu/%.c=$(BUILD)/tests/gpu/%))
EXAMPLES  := $(EX_SRC:examples/%.c=$(BUILD)/examples/%)


.PHONY: all lib setup run check test test-gpu test-asan test-asan-run refdata parity-ref hf-tiny-ref fuzz fuzz-smoke fuzz-build clean tests examples
all: lib $(BUILD)/kiln examples
lib: $(BUILD)/libkiln.a $(BUILD)/libkiln.so $(BUILD)/kiln.pc $(CUDA_PLUGIN)
examples: $(EXAMPLES)
tests: $(TESTS) $(GPU_TESTS) $(GPU_BENCH) $(CUDA_PLUGIN)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -MF $(@:.o=.d) -c $< -o $@

# The chat page is assembled into page.o (.incbin), which -MMD cannot see.
$(BUILD)/obj/src/server/page.o: src/server/chat.html

$(BUILD)/libkiln.a: $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# Only what kiln.h and kiln_tools.h declare (KILN_API) is exported;
# check-exports.sh fails the build on anything else.
$(BUILD)/libkiln.so: $(LIB_OBJ) scripts/check-exports.sh
	$(CC) -shared -o $@ $(LIB_OBJ) $(LDFLAGS) $(LDLIBS)
	scripts/check-exports.sh $@

# kiln serve and kiln eval (src/server, src/eval): may call only what
# libkiln.so exports, and util/ (check-cli-symbols.sh).
$(APP_LIB): $(APP_OBJ) $(BUILD)/libkiln.a $(BUILD)/libkiln.so scripts/check-cli-symbols.sh
	scripts/check-cli-symbols.sh $(BUILD) $(APP_OBJ)
	rm -f $@ && ar rcs $@ $(APP_OBJ)

$(BUILD)/libkiln-cuda.so: $(CU_OBJ) $(CU_HELPERS) src/backend/cuda/plugin.map
	$(CC) -shared -o $@ $(CU_OBJ) $(CU_HELPERS) -Wl,-Bsymbolic -Wl,--no-undefined \
	    -Wl,--version-script=src/backend/cuda/plugin.map $(CUDA_LIBS) -lm

# What a program linking libkiln.a needs besides it (pkg-config --static):
# the libraries that have a pkg-config file go to Requires.private, so that
# their own private dependencies come along (add a new one there as well as
# to LDLIBS); Libs.private holds the rest of LDLIBS and OpenMP's runtime,
# which the objects call (-fopenmp links it for kiln's own binaries; a
# program linking the archive needs it named).  tests/test_cli.c links
# examples/generate.c statically with what pkg-config gives.
PC_REQUIRES := jansson libpcre2-8 libutf8proc libxxhash
PC_LIBS     := -lgomp $(filter-out $(addprefix -l,$(patsubst lib%,%,$(PC_REQUIRES))),$(LDLIBS))

$(BUILD)/kiln.pc: scripts/kiln.pc.in Makefile
	@mkdir -p $(dir $@)
	sed -e 's|@PREFIX@|$(abspath .)|' -e 's|@VERSION@|0.1.0|' \
	    -e 's|@REQUIRES@|$(PC_REQUIRES)|' -e 's|@LIBS@|$(PC_LIBS)|' $< > $@

# The CLI links the static library but may call only what libkiln.so
# exports, and util/ (check-cli-symbols.sh).
$(BUILD)/kiln: $(CLI_OBJ) $(APP_LIB) $(BUILD)/libkiln.a $(BUILD)/libkiln.so scripts/check-cli-symbols.sh
	scripts/check-cli-symbols.sh $(BUILD) $(CLI_OBJ)
	$(CC) -o $@ $(CLI_OBJ) $(APP_LIB) $(BUILD)/libkiln.a $(LDFLAGS) $(APP_LDLIBS) $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(APP_LIB) $(BUILD)/libkiln.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(APP_LIB) $(BUILD)/libkiln.a $(LDFLAGS) $(APP_LDLIBS) $(LDLIBS) -lcmocka

$(BUILD)/tests/gpu/%: tests/gpu/%.c tests/gpu/gpu_test.h $(BUILD)/libkiln.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -o $@ $< $(BUILD)/libkiln.a $(LDFLAGS) $(LDLIBS) -lcmocka

$(BUILD)/bench/%: bench/gpu/%.c $(BUILD)/libkiln.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -o $@ $< $(BUILD)/libkiln.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/examples/%: examples/%.c $(BUILD)/libkiln.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libkiln.a $(LDFLAGS) $(LDLIBS)

# ---------------------------------------------------------------------------
# Set-up and the README's two commands

setup:
	@VENV=$(VENV) scripts/setup.sh

run: setup all
	scripts/run-demo.sh

# Reference data made fresh (new random blocks) each run by the Python
# oracles (gguf-py) that setup installs into $(VENV).
refdata:
	@mkdir -p $(BUILD)/testdata
	$(VENV)/bin/python scripts/ref/quant_ref.py $(BUILD)/testdata

# The reference logits behind tests/test_parity.c (committed): Hugging Face
# transformers in float32 over the dequantized GGUF weights (needs the
# .venv-ref that `make tokenizer-ref` creates).  scripts/ref/logits_ref.py
# writes the same format from llama.cpp for comparison.
SMOLLM2 := models/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA3  := models/gemma-3-270m-q4_k_m.gguf
parity-ref:
	.venv-ref/bin/python scripts/ref/logits_ref_hf.py $(SMOLLM2) tests/data/parity/smollm2-q4_1.bin
	.venv-ref/bin/python scripts/ref/logits_ref_hf.py $(GEMMA3) tests/data/parity/gemma3-270m-q4_k_m.bin
	.venv-ref/bin/python scripts/ref/logits_ref_hf.py --long $(GEMMA3) tests/data/parity/gemma3-270m-q4_k_m-long.bin

# Tiny random Hugging Face models (llama, qwen2, qwen3, gemma3_text) and
# transformers' logits for them, behind tests/test_hf_models.c (committed).
hf-tiny-ref:
	.venv-ref/bin/python scripts/ref/make_tiny_hf.py tests/data/hf-tiny

test: all tests refdata
	scripts/run-tests.sh $(BUILD)

check: setup
	$(MAKE) all tests
	$(MAKE) refdata
	scripts/run-tests.sh $(BUILD) --summary $(BUILD)/summary-release.txt
	$(MAKE) test-asan-run
	$(MAKE) fuzz-smoke
	scripts/summarize-tests.sh $(BUILD)/summary-release.txt build/asan/summary-asan.txt

# On a machine with a CUDA GPU: every CUDA op against the CPU op, whole
# models against transformers and the CPU backend, memcheck (scripts/gpu/
# test.sh says what each step needs).  scripts/gpu/pack.sh builds the same
# binaries here for a GPU machine without kiln's libraries.
test-gpu: all tests
	@mkdir -p $(BUILD)/gpu-bin
	cp $(BUILD)/kiln $(GPU_TESTS) $(CUDA_PLUGIN) $(BUILD)/gpu-bin/
	scripts/gpu/test.sh $(BUILD)/gpu-bin

test-asan: refdata
	$(MAKE) test-asan-run

test-asan-run:
	$(MAKE) BUILD=build/asan SANITIZE=1 CUDA=0 tests build/asan/kiln
	@mkdir -p build/asan/testdata && cp -r $(BUILD)/testdata/. build/asan/testdata/
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    scripts/run-tests.sh build/asan --summary build/asan/summary-asan.txt

# ---------------------------------------------------------------------------
# libFuzzer targets (clang): the library is rebuilt with coverage + ASan/UBSan.

FUZZ_CC       ?= clang
FUZZ_BUILD    := build/fuzz
FUZZ_CFLAGS   := $(CSTD) -O1 -g $(ARCH) -fopenmp -fsanitize=fuzzer-no-link,address,undefined \
                 -fno-sanitize-recover=all -Iinclude -Isrc -DKILN_FUZZ
FUZZ_LIB_OBJ  := $(LIB_SRC:%.c=$(FUZZ_BUILD)/obj/%.o) $(APP_SRC:%.c=$(FUZZ_BUILD)/obj/%.o)
FUZZERS       := $(FUZZ_SRC:tests/fuzz/%.c=$(FUZZ_BUILD)/%)
FUZZ_SMOKE_SECS ?= 10
FUZZ_SECS     ?= 600

$(FUZZ_BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

$(FUZZ_BUILD)/%: tests/fuzz/%.c $(FUZZ_LIB_OBJ)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_LIB_OBJ) $(APP_LDLIBS) $(LDLIBS)

$(FUZZ_BUILD)/obj/src/server/page.o: src/server/chat.html

# Keep the instrumented objects between fuzz builds.
.SECONDARY: $(FUZZ_LIB_OBJ)

fuzz-build: $(FUZZERS)

fuzz-smoke: fuzz-build
	scripts/run-fuzz.sh $(FUZZ_SMOKE_SECS) $(FUZZERS)

fuzz: fuzz-build
	scripts/run-fuzz.sh $(FUZZ_SECS) $(FUZZERS)

clean:
	rm -rf build

-include $(shell find $(BUILD)/obj $(BUILD)/tests $(FUZZ_BUILD)/obj -name '*.d' 2>/dev/null)

# ---------------------------------------------------------------------------
# Tokenizer reference data: the ids and chat renders tests/test_tokenizer.c
# compares against, from Hugging Face transformers/tokenizers in .venv-ref
# (scripts/ref/tokenizer_ref.py says what each file is).  Not part of check.
REF_VENV  ?= .venv-ref
TOK_DATA  := tests/data/tokenizer

.PHONY: tokenizer-ref
tokenizer-ref:
	@test -x $(REF_VENV)/bin/python || { $(PYTHON) -m venv $(REF_VENV) && \
	    $(REF_VENV)/bin/pip install -q transformers tokenizers gguf sentencepiece \
	    protobuf numpy jinja2 torch accelerate; }
	scripts/fetch-gemma.sh
	$(REF_VENV)/bin/python scripts/ref/tokenizer_ref.py ids $(TOK_DATA)/corpus.txt $(TOK_DATA)
	$(REF_VENV)/bin/python scripts/ref/tokenizer_ref.py chat $(TOK_DATA)
	$(REF_VENV)/bin/python scripts/ref/tokenizer_ref.py hf $(TOK_DATA)/corpus.txt $(TOK_DATA)
