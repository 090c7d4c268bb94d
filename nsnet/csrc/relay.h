/* nsnet's splice(2) relay for the published-port fast path (relay.c). */
#ifndef NSNET_RELAY_H
#define NSNET_RELAY_H

#include <stddef.h>
#include <stdint.h>

#define RELAY_BUDGET 0  /* the time budget ran out */
#define RELAY_WAKE 1    /* a watched fd is readable (or a signal came) */

struct relay_stats {
    uint64_t active;    /* pairs being relayed now */
    uint64_t total;     /* pairs ever added */
    uint64_t closed;    /* pairs closed after both directions finished */
    uint64_t reset;     /* pairs closed on an error (both sides reset) */
    uint64_t failed;    /* relay_add failures */
    uint64_t bytes[2];  /* [0]: outer -> inner, [1]: inner -> outer */
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

#endif
