# realm build. `make` builds build/realm; `make test` runs the suite; `make asan` runs it under
# AddressSanitizer + UBSan; `make demo` does the fresh-machine walk-through.
CC       ?= cc
BUILD    ?= build
OPT      ?= -O2
MULTIARCH := $(shell $(CC) -print-multiarch 2>/dev/null)
LUA_INC  ?= /usr/include/lua5.4
LUA_LIB  ?= /usr/lib/$(MULTIARCH)/liblua5.4.a
CPPFLAGS += -I gen -I backends -I runtime -I $(LUA_INC) -D_GNU_SOURCE
CFLAGS   += -std=c11 $(OPT) -g -Wall -Wextra -Werror -pthread $(SAN)
LDLIBS   += $(LUA_LIB) -lm -ldl -pthread

LIB_SRC  := $(wildcard gen/*.c gen/ops/*.c backends/*.c runtime/*.c)
LIB_SRC  := $(filter-out runtime/main.c,$(LIB_SRC))
LUA_SRC  := $(sort $(wildcard models/lib/*.lua))
TEST_SRC := $(wildcard tests/*.c)
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(BUILD)/obj/lualib.o
TEST_OBJ := $(TEST_SRC:%.c=$(BUILD)/obj/%.o)
DEPS     := $(LIB_OBJ:.o=.d) $(TEST_OBJ:.o=.d) $(BUILD)/obj/runtime/main.d

.PHONY: all test asan demo bench test-gpu clean FORCE
all: $(BUILD)/realm $(BUILD)/realm_tests

$(BUILD)/realm: $(BUILD)/obj/runtime/main.o $(LIB_OBJ)
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/realm_tests: $(TEST_OBJ) $(LIB_OBJ)
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c -o $@ $<

# The block library is compiled into the binary, so a model file never needs the source tree.
$(BUILD)/gen/lualib.c: $(LUA_SRC) Makefile
	@mkdir -p $(dir $@)
	@{ echo '#include "embedded_lua.h"'; \
	   for f in $(LUA_SRC); do n=$$(basename $$f .lua); \
	     echo "static const unsigned char src_$$n[] = {"; \
	     od -An -v -tx1 $$f | sed 's/\([0-9a-f][0-9a-f]\)/0x\1,/g'; echo '0x00};'; done; \
	   echo 'const lualib_file realm_lualib[] = {'; \
	   for f in $(LUA_SRC); do n=$$(basename $$f .lua); \
	     echo "  {\"realm.$$n\", \"$$f\", (const char *)src_$$n, sizeof src_$$n - 1},"; done; \
	   echo '  {0, 0, 0, 0}};'; } > $@

$(BUILD)/obj/lualib.o: $(BUILD)/gen/lualib.c
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

# Test names are collected from the TEST(name) and TEST_SLOW(name) definitions, on every make
# (a removed test file must leave the list too); the header changes only when the list does.
$(BUILD)/gen/tests_list.h: $(TEST_SRC) FORCE
	@mkdir -p $(dir $@)
	@grep -ho '^TEST\(_SLOW\)\?([A-Za-z0-9_]*)' $(TEST_SRC) | \
	  sed 's/^TEST(\(.*\))/X(\1, 0)/; s/^TEST_SLOW(\(.*\))/X(\1, 1)/' > $@.tmp
	@cmp -s $@.tmp $@ || mv $@.tmp $@; rm -f $@.tmp

FORCE:

$(BUILD)/obj/tests/runner.o: $(BUILD)/gen/tests_list.h
$(BUILD)/obj/tests/runner.o: CPPFLAGS += -I $(BUILD)/gen

test: $(BUILD)/realm $(BUILD)/realm_tests
	REALM_BIN=$(BUILD)/realm $(BUILD)/realm_tests $(T)

asan:
	$(MAKE) BUILD=build-asan OPT=-O1 SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" test

test-gpu: $(BUILD)/realm $(BUILD)/realm_tests
	REALM_GPU=1 REALM_BIN=$(BUILD)/realm $(BUILD)/realm_tests $(T)

demo:
	bash .ci/install-deps
	$(MAKE) $(BUILD)/realm
	bash corpus/demo.sh

bench: $(BUILD)/realm
	bash bench/run.sh

clean:
	rm -rf build build-asan

-include $(DEPS)
