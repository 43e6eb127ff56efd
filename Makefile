# Makefile for patio.h: builds and runs the tests, examples, benchmarks and
# fuzzers. The library itself needs no build step; this file is only for
# working on it. GNU make; works with CC=gcc and CC=clang.
#
#   make test          tests/test_*.c (+ tests/*.sh), build/default/
#   make test-asan     AddressSanitizer + UBSan, build/asan/
#   make test-tsan     ThreadSanitizer, build/tsan/
#   make test-poll     the poll() backend forced on Linux, build/poll/
#   make test-cxx      the tests (and so the header) compiled as C++11, build/cxx/
#   make test-kqueue   the kqueue backend with pipe wake-ups (as on macOS and
#                      the BSDs), on Linux through the epoll-based kqueue of
#                      tests/kqueue/sys/event.h, build/kqueue/
#   make test-symbols  every exported symbol of the implementation is patio_*
#   make test-tls3     the TLS tests, TLS examples and TLS interop cases against
#                      Debian 13's mbedTLS 3.6, fetched into MBEDTLS3 by
#                      tests/tls/fetch_mbedtls3.sh (when not there yet),
#                      build/tls3/; test-tls3-asan (ASan + UBSan, build/tls3-asan/),
#                      test-tls3-tsan (build/tls3-tsan/) and test-tls3-cxx (as
#                      C++11, build/tls3-cxx/) likewise
#   make examples      examples/*.c with the plain flags the README promises
#   make quickstart    builds and runs examples/quickstart.c
#   make bench         tests/bench/bench_*.c, -O2 -DNDEBUG, run one after another
#   make fuzz          tests/fuzz/fuzz_*.c (clang, libFuzzer), FUZZ_SECONDS each
#   make clean
#
# Each variant builds into its own directory, so they coexist. A variant's
# programs are rebuilt when patio.h, a header under tests/, the test source
# or the compile command (CC, CFLAGS, ...) changes.
#
# Knobs: CC, CXX (derived from CC: gcc -> g++, clang -> clang++, else c++),
# CFLAGS / CXXFLAGS / LDFLAGS (appended), TEST_TIMEOUT (seconds per test
# program, default 120), TEST_FILTER (run only programs whose name contains
# it), FUZZ_SECONDS (default 30), FUZZ_CC (default: CC if it is clang, else
# clang), MBEDTLS_PREFIX (an mbedTLS to build the TLS programs of every other
# target with instead of the system's: DIR/include and DIR/lib, as
# tests/tls/fetch_mbedtls3.sh lays them out; e.g. `make bench
# MBEDTLS_PREFIX=build/mbedtls3`), MBEDTLS3 (where test-tls3* find or fetch
# mbedTLS 3.6, default build/mbedtls3).

.SUFFIXES:
.DELETE_ON_ERROR:
.DEFAULT_GOAL := all

# ---------------------------------------------------------------- compilers

# CXX follows CC unless it was given explicitly (command line or environment).
cc_word := $(firstword $(CC))
cc_base := $(notdir $(cc_word))
cc_dir  := $(patsubst %$(cc_base),%,$(cc_word))
ifeq ($(origin CXX),default)
  ifneq ($(findstring clang,$(cc_base)),)
    CXX := $(cc_dir)$(subst clang,clang++,$(cc_base))
  else ifneq ($(findstring gcc,$(cc_base)),)
    CXX := $(cc_dir)$(subst gcc,g++,$(cc_base))
  else
    CXX := c++
  endif
endif

ifneq ($(findstring clang,$(cc_base)),)
  FUZZ_CC ?= $(CC)
else
  FUZZ_CC ?= clang
endif

# -------------------------------------------------------------------- flags

WARN    := -Wall -Wextra -Wpedantic -Werror
INC     := -I. -Itests
LDLIBS  := -pthread -lm

# Programs that include patio_tls.h (tests/test_tls*.c, examples/tls_*.c,
# tests/bench/bench_tls*.c) also link mbedTLS: the system's, or the one
# under a prefix (its headers with -isystem, so they are not warned about;
# its libraries found at run time through the rpath).
MBEDTLS_PREFIX ?=
MBEDTLS3       ?= build/mbedtls3
comma     := ,
tls_inc   = $(if $(1),-isystem $(abspath $(1))/include)
tls_libs  = $(if $(1),-L$(abspath $(1))/lib -Wl$(comma)-rpath$(comma)$(abspath $(1))/lib) -lmbedtls -lmbedx509 -lmbedcrypto
TLS_INC   := $(call tls_inc,$(MBEDTLS_PREFIX))
TLS_LIBS  := $(call tls_libs,$(MBEDTLS_PREFIX))
TLS3_INC  := $(call tls_inc,$(MBEDTLS3))
TLS3_LIBS := $(call tls_libs,$(MBEDTLS3))

BASE_CFLAGS := -std=c99 $(WARN) -g $(INC) -pthread
SAN_ASAN    := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
SAN_TSAN    := -fsanitize=thread

# One compiler + flags pair per test variant: <variant>_CC, <variant>_FLAGS.
# A variant with <variant>_TESTS builds only those tests; <variant>_TLS_LIBS
# replaces TLS_LIBS.
default_CC    := $(CC)
default_FLAGS := $(BASE_CFLAGS) $(TLS_INC) -O2 $(CFLAGS)
asan_CC       := $(CC)
asan_FLAGS    := $(BASE_CFLAGS) $(TLS_INC) -O1 $(SAN_ASAN) $(CFLAGS)
tsan_CC       := $(CC)
tsan_FLAGS    := $(BASE_CFLAGS) $(TLS_INC) -O1 $(SAN_TSAN) $(CFLAGS)
poll_CC       := $(CC)
poll_FLAGS    := $(BASE_CFLAGS) $(TLS_INC) -O2 -DPATIO_USE_POLL $(CFLAGS)
cxx_CC        := $(CXX)
cxx_FLAGS     := -x c++ -std=c++11 $(WARN) -g $(INC) $(TLS_INC) -pthread -O2 $(CXXFLAGS)
kqueue_CC     := $(CC)
kqueue_FLAGS  := $(BASE_CFLAGS) -Itests/kqueue $(TLS_INC) -O2 -DPATIO_USE_KQUEUE -DPATIO_NO_EVENTFD $(CFLAGS)

# The TLS tests against mbedTLS 3.6 (MBEDTLS3).
tls3_CC               := $(CC)
tls3_FLAGS            := $(BASE_CFLAGS) $(TLS3_INC) -O2 $(CFLAGS)
tls3-asan_CC          := $(CC)
tls3-asan_FLAGS       := $(BASE_CFLAGS) $(TLS3_INC) -O1 $(SAN_ASAN) $(CFLAGS)
tls3-tsan_CC          := $(CC)
tls3-tsan_FLAGS       := $(BASE_CFLAGS) $(TLS3_INC) -O1 $(SAN_TSAN) $(CFLAGS)
tls3-cxx_CC           := $(CXX)
tls3-cxx_FLAGS        := -x c++ -std=c++11 $(WARN) -g $(INC) $(TLS3_INC) -pthread -O2 $(CXXFLAGS)
TLS3_VARIANTS         := tls3 tls3-asan tls3-tsan tls3-cxx
# each of them builds only the TLS tests, linked with TLS3_LIBS
$(foreach v,$(TLS3_VARIANTS),$(eval $(v)_TESTS = $$(TLS_TEST_NAMES))$(eval $(v)_TLS_LIBS := $$(TLS3_LIBS)))

VARIANTS := default asan tsan poll cxx kqueue $(TLS3_VARIANTS)

# Environment for running each variant's programs.
default_ENV :=
asan_ENV    := ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
tsan_ENV    := TSAN_OPTIONS='halt_on_error=1 second_deadlock_stack=1'
poll_ENV    :=
cxx_ENV     :=
kqueue_ENV  :=
tls3_ENV      := $(default_ENV)
tls3-asan_ENV := $(asan_ENV)
tls3-tsan_ENV := $(tsan_ENV)
tls3-cxx_ENV  := $(cxx_ENV)

# The examples are built exactly as their header comments say, plus -Werror.
EXAMPLE_CFLAGS := -std=c99 -Wall -Wextra -Werror -pthread
BENCH_CFLAGS   := -std=c99 $(WARN) -g -O2 -DNDEBUG $(INC) $(TLS_INC) -pthread $(CFLAGS)
FUZZ_CFLAGS    := -std=c99 $(WARN) -g -O1 $(INC) -fsanitize=fuzzer,address,undefined \
                  -fno-omit-frame-pointer -fno-sanitize-recover=all $(CFLAGS)
FUZZ_SECONDS   ?= 30

# ------------------------------------------------------------------ sources

TEST_SRCS    := $(sort $(wildcard tests/test_*.c))
TEST_NAMES   := $(patsubst tests/%.c,%,$(TEST_SRCS))
TLS_TEST_NAMES := $(filter test_tls%,$(TEST_NAMES))
TEST_HEADERS := patio.h patio_tls.h $(wildcard tests/*.h)
EXAMPLE_SRCS := $(sort $(wildcard examples/*.c))
EXAMPLE_BINS := $(patsubst examples/%.c,build/examples/%,$(EXAMPLE_SRCS))
BENCH_SRCS   := $(sort $(wildcard tests/bench/bench_*.c))
BENCH_BINS   := $(patsubst tests/bench/%.c,build/bench/%,$(BENCH_SRCS))
FUZZ_SRCS    := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BINS    := $(patsubst tests/fuzz/%.c,build/fuzz/%,$(FUZZ_SRCS))

TLS3_EXAMPLE_BINS := $(patsubst examples/%.c,build/tls3/examples/%,$(filter examples/tls_%,$(EXAMPLE_SRCS)))

# tests/interop.sh builds the TLS examples with INTEROP_TLS.
INTEROP_TLS = $(TLS_INC) $(TLS_LIBS)
RUN_TESTS = TEST_TIMEOUT='$(TEST_TIMEOUT)' TEST_FILTER='$(TEST_FILTER)' \
            CC='$(CC)' CXX='$(CXX)' INTEROP_TLS_FLAGS='$(INTEROP_TLS)' bash tests/run.sh

# -------------------------------------------------------------------- rules

# build/<dir>/.cmd holds the command a directory was built with; it is only
# rewritten when that command changes, so switching CC or flags rebuilds.
# $(1): directory, $(2): the command line.
define cmd_stamp
$(1)/.cmd: FORCE
	@mkdir -p $(1)
	@printf '%s\n' '$(2)' | cmp -s - $$@ || printf '%s\n' '$(2)' > $$@
endef

# $(1): variant name.
define test_variant
$(call cmd_stamp,build/$(1),$$($(1)_CC) $$($(1)_FLAGS) $$(LDFLAGS) $$(LDLIBS))

build/$(1)/test_%: tests/test_%.c $$(TEST_HEADERS) build/$(1)/.cmd
	$$($(1)_CC) $$($(1)_FLAGS) -MMD -MP -MF $$@.d $$< -o $$@ $$(LDFLAGS) $$(LDLIBS) $$(EXTRA_LIBS)

$$(addprefix build/$(1)/,$$(TLS_TEST_NAMES)): EXTRA_LIBS = $$(or $$($(1)_TLS_LIBS),$$(TLS_LIBS))

build/$(1)/symbols_tu.o: tests/symbols_tu.c $$(TEST_HEADERS) build/$(1)/.cmd
	$$($(1)_CC) $$($(1)_FLAGS) -MMD -MP -MF $$@.d -c $$< -o $$@

$(1)_BINS := $$(addprefix build/$(1)/,$$(or $$($(1)_TESTS),$$(TEST_NAMES) symbols_tu.o))

# tests/run.sh runs whatever is in the directory, so a program whose source
# is gone (deleted or renamed test) is removed first.
build-$(1): $$($(1)_BINS)
	@for f in build/$(1)/test_*; do \
	    case $$$$f in *.d) continue ;; esac; \
	    [ -f "$$$$f" ] || continue; \
	    n=$$$${f##*/}; \
	    [ -f "tests/$$$$n.c" ] || { echo "removing stale $$$$f"; rm -f "$$$$f" "$$$$f.d"; }; \
	done

-include $$(wildcard build/$(1)/*.d)
endef

$(foreach v,$(VARIANTS),$(eval $(call test_variant,$(v))))

$(eval $(call cmd_stamp,build/examples,$(CC) $(EXAMPLE_CFLAGS) $(TLS_INC) $(LDFLAGS)))
build/examples/%: examples/%.c patio.h patio_tls.h build/examples/.cmd
	$(CC) $(EXAMPLE_CFLAGS) $(TLS_INC) -MMD -MP -MF $@.d $< -o $@ $(LDFLAGS) $(EXTRA_LIBS)

$(filter build/examples/tls_%,$(EXAMPLE_BINS)): EXTRA_LIBS = $(TLS_LIBS)

# The TLS examples against mbedTLS 3.6, built as the others are.
$(eval $(call cmd_stamp,build/tls3/examples,$(CC) $(EXAMPLE_CFLAGS) $(TLS3_INC) $(LDFLAGS)))
build/tls3/examples/%: examples/%.c patio.h patio_tls.h build/tls3/examples/.cmd
	$(CC) $(EXAMPLE_CFLAGS) $(TLS3_INC) -MMD -MP -MF $@.d $< -o $@ $(LDFLAGS) $(TLS3_LIBS)

# mbedTLS 3.6 for the tls3 variants: fetched once (an MBEDTLS3 that already
# has the headers is used as it is).
MBEDTLS3_HEADER := $(MBEDTLS3)/include/mbedtls/build_info.h
$(MBEDTLS3_HEADER):
	tests/tls/fetch_mbedtls3.sh $(MBEDTLS3)

$(foreach v,$(TLS3_VARIANTS),$($(v)_BINS)) $(TLS3_EXAMPLE_BINS): | $(MBEDTLS3_HEADER)

$(eval $(call cmd_stamp,build/bench,$(CC) $(BENCH_CFLAGS) $(LDFLAGS) $(LDLIBS)))
build/bench/%: tests/bench/%.c $(TEST_HEADERS) build/bench/.cmd
	$(CC) $(BENCH_CFLAGS) -MMD -MP -MF $@.d $< -o $@ $(LDFLAGS) $(LDLIBS) $(EXTRA_LIBS)

$(filter build/bench/bench_tls%,$(BENCH_BINS)): EXTRA_LIBS = $(TLS_LIBS)

$(eval $(call cmd_stamp,build/fuzz,$(FUZZ_CC) $(FUZZ_CFLAGS) $(LDFLAGS) $(LDLIBS)))
build/fuzz/%: tests/fuzz/%.c $(TEST_HEADERS) build/fuzz/.cmd
	$(FUZZ_CC) $(FUZZ_CFLAGS) -MMD -MP -MF $@.d $< -o $@ $(LDFLAGS) $(LDLIBS)

-include $(wildcard build/examples/*.d build/tls3/examples/*.d build/bench/*.d build/fuzz/*.d)

# ------------------------------------------------------------------ targets

.PHONY: all test test-asan test-tsan test-poll test-cxx test-kqueue test-symbols \
        test-tls3 test-tls3-asan test-tls3-tsan test-tls3-cxx \
        examples quickstart bench fuzz fuzz-build clean FORCE \
        $(addprefix build-,$(VARIANTS))
FORCE:

all: build-default examples

test: build-default
	@$(default_ENV) $(RUN_TESTS) build/default

test-asan: build-asan
	@$(asan_ENV) $(RUN_TESTS) build/asan

test-tsan: build-tsan
	@$(tsan_ENV) $(RUN_TESTS) build/tsan

test-poll: build-poll
	@$(poll_ENV) $(RUN_TESTS) build/poll

test-cxx: build-cxx
	@$(cxx_ENV) $(RUN_TESTS) build/cxx

test-kqueue: build-kqueue
	@$(kqueue_ENV) $(RUN_TESTS) build/kqueue

# The TLS tests, and the interop suite's TLS cases with the examples it
# builds linked with the same mbedTLS; the sanitizer and C++ runs leave the
# interop suite out.
test-tls3: INTEROP_TLS = $(TLS3_INC) $(TLS3_LIBS)
test-tls3: build-tls3 $(TLS3_EXAMPLE_BINS)
	@$(tls3_ENV) TEST_SCRIPTS=interop.sh INTEROP_FILTER=tls $(RUN_TESTS) build/tls3

test-tls3-asan: build-tls3-asan
	@$(tls3-asan_ENV) TEST_SCRIPTS= $(RUN_TESTS) build/tls3-asan

test-tls3-tsan: build-tls3-tsan
	@$(tls3-tsan_ENV) TEST_SCRIPTS= $(RUN_TESTS) build/tls3-tsan

test-tls3-cxx: build-tls3-cxx
	@$(tls3-cxx_ENV) TEST_SCRIPTS= $(RUN_TESTS) build/tls3-cxx

test-symbols: build/default/symbols_tu.o
	@CC='$(CC)' bash tests/check_symbols.sh build/default

examples: $(EXAMPLE_BINS)

quickstart: build/examples/quickstart
	./build/examples/quickstart

bench: $(BENCH_BINS)
	@status=0; for b in $(BENCH_BINS); do \
	    echo "== $$b"; ./$$b || { echo "$$b: exit status $$?"; status=1; }; \
	done; \
	[ -n "$(BENCH_BINS)" ] || echo "no benchmarks in tests/bench/"; \
	exit $$status

fuzz-build: $(FUZZ_BINS)

# Each fuzzer keeps its growing corpus in build/fuzz/corpus/<name>/ and also
# reads the checked-in seeds in tests/fuzz/corpus/<name>/ when they exist.
# Crashes are written to build/fuzz/artifacts/.
fuzz: $(FUZZ_BINS)
	@status=0; mkdir -p build/fuzz/artifacts; for b in $(FUZZ_BINS); do \
	    n=$${b##*/}; mkdir -p build/fuzz/corpus/$$n; \
	    seeds=; [ -d tests/fuzz/corpus/$$n ] && seeds=tests/fuzz/corpus/$$n; \
	    echo "== $$n ($(FUZZ_SECONDS) s)"; \
	    ./$$b -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	        -artifact_prefix=build/fuzz/artifacts/$$n- \
	        build/fuzz/corpus/$$n $$seeds || { echo "$$n: FAILED"; status=1; }; \
	done; \
	[ -n "$(FUZZ_BINS)" ] || echo "no fuzzers in tests/fuzz/"; \
	exit $$status

clean:
	rm -rf build
