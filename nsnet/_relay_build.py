"""cffi API-mode build of nsnet's splice relay (the published-port fast
path, csrc/relay.c): module ``nsnet._relay_cffi``.  Run by setuptools at
install time (setup.py's cffi_modules).  It needs no library but libc."""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")

CDEF = r"""
#define RELAY_BUDGET ...
#define RELAY_WAKE ...

struct relay_stats {
    uint64_t active;
    uint64_t total;
    uint64_t closed;
    uint64_t reset;
    uint64_t failed;
    uint64_t bytes[2];
    uint64_t turns;
};
struct relay;
struct relay *relay_new(size_t pipe_size);
int relay_watch(struct relay *r, int fd);
int relay_unwatch(struct relay *r, int fd);
int relay_add(struct relay *r, int outer, int inner);
int relay_run(struct relay *r, int budget_ms);
void relay_get_stats(struct relay *r, struct relay_stats *out);
void relay_free(struct relay *r);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "nsnet._relay_cffi",
    '#include "relay.h"\n',
    # setuptools wants paths relative to setup.py's directory
    sources=[os.path.relpath(os.path.join(CSRC, "relay.c"), os.path.dirname(HERE))],
    include_dirs=[CSRC],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
